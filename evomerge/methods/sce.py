"""sce: Select (the elements where the task vectors vary most), Calculate (each task vector's
weight from its mean square), Erase (minority signs), then a weighted disjoint mean."""

from __future__ import annotations

import torch

from evomerge.methods.base import Paper, ParamScope, ParamSpec
from evomerge.methods.whole import BasePolicy, Inputs, WholeTensorMerge


def select_mask(tvs: torch.Tensor, density: float, dtype: torch.dtype) -> torch.Tensor:
    """1 at the int(nonzero * density) elements of largest variance across the task vectors."""
    if density <= 0:
        return torch.zeros_like(tvs[0], dtype=dtype)
    if density >= 1:
        return torch.ones_like(tvs[0], dtype=dtype)
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    if k == 0:
        return torch.zeros_like(var, dtype=dtype)
    _, top = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask = torch.zeros_like(var, dtype=dtype)
    mask.view(-1)[top] = 1
    return mask


def tv_weights(tvs: torch.Tensor) -> torch.Tensor:
    """mean(tv_i²) / sum_j mean(tv_j²); equal weights where that sum is (nearly) zero."""
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    if abs(total) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


def _merge(inputs: Inputs, shared, per_source) -> torch.Tensor:
    base = inputs.base
    assert base is not None
    if not inputs.others:
        return base
    mask_dtype = torch.int8 if shared["int8_mask"] else base.dtype
    tvs = torch.stack([t - base for t in inputs.others], dim=0)
    if shared["select_topk"] < 1:
        tvs = tvs * select_mask(tvs, shared["select_topk"], mask_dtype).unsqueeze(0)
    sign = tvs.sign().to(mask_dtype)  # TIES' sign election by the summed task vectors
    majority = (tvs.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    erase = sign == majority
    weights = tv_weights(tvs)
    while weights.dim() < tvs.dim():
        weights = weights.unsqueeze(-1)
    erased = weights * erase
    merged = (tvs * erased).sum(dim=0)
    return base + merged / torch.sum(erased, dim=0).clamp(min=1e-6)


METHOD = WholeTensorMerge(
    name="sce",
    paper=Paper("FuseChat: Knowledge Fusion of Chat Models", "2408.07990"),
    params=(
        ParamSpec("int8_mask", bool, ParamScope.SHARED, False),
        ParamSpec("select_topk", float, ParamScope.SHARED, 1.0),
    ),
    fn=_merge,
    base_policy=BasePolicy.REQUIRED,
)
