"""ramplus_tl: RAM+ (tensor-local): as ram, with each model's unique changes scaled up by
1 + r * min(alpha, shared/unique), its counts of shared and unique changed elements."""

from __future__ import annotations

import torch

from evomerge.methods.base import ParamScope, ParamSpec
from evomerge.methods.ram import EPSILON, PAPER, contributions
from evomerge.methods.whole import BasePolicy, Inputs, WholeTensorMerge


def _merge(inputs: Inputs, shared, per_source) -> torch.Tensor:
    base = inputs.base
    assert base is not None
    if not inputs.others:
        return base
    eps = shared["epsilon"]
    c = contributions(inputs, eps)
    n_shared = (c.changed & c.overlap).sum(dim=1)
    n_unique = (c.changed & c.unique).sum(dim=1)
    rho = n_shared / n_unique.clamp(min=eps)
    lam = 1 + shared["r"] * rho.clamp(min=0, max=shared["alpha"])
    tv = c.tv * c.changed
    merged = ((tv * c.unique * lam.unsqueeze(-1))
              + (tv * c.overlap / c.counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


METHOD = WholeTensorMerge(
    name="ramplus_tl",
    paper=PAPER,
    params=(
        ParamSpec("r", float, ParamScope.SHARED, 0.1),
        ParamSpec("alpha", float, ParamScope.SHARED, 0.2),
        EPSILON,
    ),
    fn=_merge,
    base_policy=BasePolicy.REQUIRED,
)
