"""tsv: TSV-Merge (task singular vectors; Gargiulo et al., CVPR 2025).

Per layer matrix: the truncated SVD of each task matrix d_i = U_i S_i V_i^T (the top r singular
triplets of each, r = int(rank_fraction * min(m, n) / T) for T tasks, so rank_fraction = 1 is the
paper's 1/T share of the rank); the kept U_i side by side into U = [U_1 .. U_T], the V_i into V;
decorrelated by their orthogonal polar factors (orthogonal Procrustes: U_perp = P Q^T for
U = P S Q^T, the same for V); result B + alpha * U_perp diag(S_1 .. S_T) V_perp^T. Other tensors:
B + alpha * mean_i d_i. The paper's defaults: rank_fraction 1, alpha 1.
"""

from __future__ import annotations

import torch

from evomerge.methods.base import Paper, ParamScope, ParamSpec
from evomerge.methods.spectral import (
    ALPHA,
    WEIGHT,
    finish,
    is_task_matrix,
    mean_task_vector,
    polar,
    task_vectors,
)
from evomerge.methods.whole import BasePolicy, Inputs, WholeTensorMerge

RANK_FRACTION = ParamSpec("rank_fraction", float, ParamScope.SHARED, 1.0)


def kept_rank(shape: torch.Size, tasks: int, rank_fraction: float) -> int:
    """Singular triplets kept per task: at least 1, at most the task's share min(m, n) // T
    (so the T blocks fit side by side in min(m, n) columns, as in the paper's code)."""
    full = min(shape)
    share = max(1, full // tasks)
    return max(1, min(share, int(full * rank_fraction / tasks)))


def _decorrelated(deltas: list[torch.Tensor], rank_fraction: float):
    """(U_perp, the kept singular values of every task, V_perp^T, the rank kept per task)."""
    r = kept_rank(deltas[0].shape, len(deltas), rank_fraction)
    us, ss, vhs = [], [], []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        us.append(u[:, :r])
        ss.append(s[:r])
        vhs.append(vh[:r, :])
    u_perp = polar(torch.cat(us, dim=1))  # m x Tr
    vh_perp = polar(torch.cat(vhs, dim=0))  # Tr x n (rows: the V_i^T stacked)
    return u_perp, torch.cat(ss), vh_perp, r


def tsv_matrix(deltas: list[torch.Tensor], rank_fraction: float) -> torch.Tensor:
    u_perp, s, vh_perp, _ = _decorrelated(deltas, rank_fraction)
    return u_perp @ torch.diag(s) @ vh_perp


def tsv_parts(deltas: list[torch.Tensor], rank_fraction: float) -> list[torch.Tensor]:
    """Each task's block of the TSV matrix (they sum to ``tsv_matrix``). A task vector scaled by
    w > 0 keeps its singular vectors, so TSV of the weighted task vectors is sum_i w_i part_i of
    the unweighted ones: linear in the weights (search/refine trains them so)."""
    u_perp, s, vh_perp, r = _decorrelated(deltas, rank_fraction)
    return [u_perp[:, i * r:(i + 1) * r] @ torch.diag(s[i * r:(i + 1) * r]) @ vh_perp[i * r:(i + 1) * r]
            for i in range(len(deltas))]


def _merge(inputs: Inputs, shared, per_source) -> torch.Tensor:
    assert inputs.base is not None
    deltas = task_vectors(inputs, per_source)
    if is_task_matrix(inputs.name, inputs.base):
        merged = tsv_matrix(deltas, shared["rank_fraction"])
    else:
        merged = mean_task_vector(deltas)
    return finish(inputs, merged, shared["alpha"])


METHOD = WholeTensorMerge(
    name="tsv",
    paper=Paper("Task Singular Vectors: Reducing Task Interference in Model Merging",
                "2412.00081"),
    params=(WEIGHT, RANK_FRACTION, ALPHA),
    fn=_merge,
    base_policy=BasePolicy.REQUIRED,
    min_non_base=1,
)
