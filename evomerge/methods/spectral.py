"""What the spectral methods (tsv, iso_c, iso_cts) share: which tensors they treat as task
matrices, the weighted task vectors, the orthogonal polar factor, and their task-arithmetic
fallback for every other tensor.

The papers (TSV-Merge, Gargiulo et al. CVPR 2025; Iso-C / Iso-CTS, Marczak et al. 2025) apply
their SVD step to the 2-D weight matrices of the transformer layers and average the task vectors
of everything else (biases, norms); token embeddings and the output head, which the papers'
vision models do not have, are treated as "everything else" here too (a vocabulary-by-hidden
matrix is a lookup table, not a linear map between two feature spaces).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.methods.base import ParamScope, ParamSpec
from evomerge.methods.whole import Inputs, weights_of

ALPHA = ParamSpec("alpha", float, ParamScope.SHARED, 1.0)  # the papers' scaling coefficient
WEIGHT = ParamSpec("weight", float, ParamScope.NON_BASE, 1.0)  # evomerge's: scales d_i first

_NOT_MATRICES = ("embed", "lm_head", "wte", "wpe")


def is_task_matrix(name: str, tensor: torch.Tensor) -> bool:
    """A 2-D layer weight (not a token embedding or output head): the SVD step applies."""
    return tensor.dim() == 2 and min(tensor.shape) > 1 and not any(s in name for s in _NOT_MATRICES)


def task_vectors(inputs: Inputs, per_source: Mapping[int, Mapping[str, Any]]) -> list[torch.Tensor]:
    """w_i (x_i - B) in float32 (float64 stays): the task matrices the SVD reads."""
    assert inputs.base is not None
    dtype = torch.float64 if inputs.base.dtype == torch.float64 else torch.float32
    base = inputs.base.to(dtype)
    return [w * (x.to(dtype) - base)
            for w, x in zip(weights_of(inputs, per_source), inputs.others, strict=True)]


def polar(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Q^T of a = P S Q^T: the (semi-)orthogonal matrix closest
    to `a` in Frobenius norm (orthogonal Procrustes), which the papers use to decorrelate the
    stacked singular vectors of several tasks."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def finish(inputs: Inputs, merged: torch.Tensor, alpha: float) -> torch.Tensor:
    """B + alpha * merged, in the inputs' dtype."""
    assert inputs.base is not None
    return (inputs.base.to(merged.dtype) + alpha * merged).to(inputs.base.dtype)


def mean_task_vector(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """The papers' rule for tensors that are not task matrices: the mean task vector."""
    return torch.stack(list(deltas)).mean(dim=0)


__all__: Sequence[str] = ["ALPHA", "WEIGHT", "finish", "is_task_matrix", "mean_task_vector",
                          "polar", "task_vectors"]
