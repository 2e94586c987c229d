"""The math of iso_c and iso_cts (Marczak et al. 2025, "No Task Left Behind: Isotropic Model
Merging with Common and Task-Specific Subspaces"); each method is its own module (iso_c.py,
iso_cts.py).

- Iso-C: the summed task matrix D = sum_i d_i = U S V^T with its spectrum made flat: every
  singular value replaced by their mean, D_iso = mean(S) U V^T; result B + alpha * D_iso.
- Iso-CTS: the top k = int(common_space_fraction * min(m, n)) directions of D (the common
  subspace), rounded so that the rest splits evenly into T task blocks of s = (min(m, n) - k) / T
  directions; each task's own top s directions of d_i - U_k U_k^T d_i (its part outside the
  common subspace); U = [U_1^ts .. U_T^ts, U_k], V likewise, decorrelated by their orthogonal polar
  factors; every singular value (the T*s task ones and the k common ones) replaced by their mean;
  result B + alpha * mean(S) U_perp V_perp^T.
Other tensors (biases, norms, embeddings): B + alpha * mean_i d_i, as in the papers' code.
"""

from __future__ import annotations

import torch

from evomerge.methods.base import Paper, ParamScope, ParamSpec
from evomerge.methods.spectral import finish, is_task_matrix, mean_task_vector, polar, task_vectors
from evomerge.methods.whole import Inputs

PAPER = Paper("No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
              "Subspaces", "2502.04959")
COMMON_SPACE_FRACTION = ParamSpec("common_space_fraction", float, ParamScope.SHARED, 0.8)


def iso_c_matrix(deltas: list[torch.Tensor]) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    return s.mean() * (u @ vh)


def subspace_sizes(shape: torch.Size, tasks: int, fraction: float) -> tuple[int, int]:
    """(k common directions, s directions per task) with k + T*s = min(m, n), the paper's
    rounding (T*s = round((min - int(fraction*min)) / T) * T), never more than min(m, n)."""
    full = min(shape)
    common = int(full * min(max(fraction, 0.0), 1.0))
    per_task = round((full - common) / tasks)
    if per_task * tasks > full:
        per_task = full // tasks
    return full - per_task * tasks, per_task


def iso_cts_matrix(deltas: list[torch.Tensor], fraction: float) -> torch.Tensor:
    k, s = subspace_sizes(deltas[0].shape, len(deltas), fraction)
    if s == 0:
        return iso_c_matrix(deltas)
    u, sv, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    uk = u[:, :k]
    us, ss, vhs = [], [], []
    for d in deltas:
        ut, st, vht = torch.linalg.svd(d - uk @ (uk.T @ d), full_matrices=False)
        us.append(ut[:, :s])
        ss.append(st[:s])
        vhs.append(vht[:s, :])
    u_all = polar(torch.cat([*us, uk], dim=1))
    vh_all = polar(torch.cat([*vhs, vh[:k, :]], dim=0))
    return torch.cat([*ss, sv[:k]]).mean() * (u_all @ vh_all)


def merge_iso(inputs: Inputs, shared, per_source, common: bool) -> torch.Tensor:
    assert inputs.base is not None
    deltas = task_vectors(inputs, per_source)
    if not is_task_matrix(inputs.name, inputs.base):
        merged = mean_task_vector(deltas)
    elif common:
        merged = iso_c_matrix(deltas)
    else:
        merged = iso_cts_matrix(deltas, shared["common_space_fraction"])
    return finish(inputs, merged, shared["alpha"])
