"""ram: Reinforced Agent Merging: elements changed (|delta| > epsilon) by one model keep that
model's change; elements changed by several get the mean of their changes."""

from __future__ import annotations

from typing import NamedTuple

import torch

from evomerge.methods.base import Paper, ParamScope, ParamSpec
from evomerge.methods.whole import BasePolicy, Inputs, WholeTensorMerge

PAPER = Paper("Reinforced Agent Merging", "2601.13572")
EPSILON = ParamSpec("epsilon", float, ParamScope.SHARED, 1e-5)


class Contributions(NamedTuple):
    tv: torch.Tensor  # [n, N] task vectors
    changed: torch.Tensor  # [n, N] bool: |tv| > epsilon
    counts: torch.Tensor  # [1, N] int64: how many models change each element
    overlap: torch.Tensor  # [1, N] bool: counts > 1
    unique: torch.Tensor  # [1, N] bool: counts == 1


def contributions(inputs: Inputs, epsilon: float) -> Contributions:
    assert inputs.base is not None
    tvs = torch.stack([t - inputs.base for t in inputs.others], dim=0)
    tv = tvs.view(len(inputs.others), -1)
    changed = tv.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return Contributions(tv, changed, counts, counts > 1, counts == 1)


def _merge(inputs: Inputs, shared, per_source) -> torch.Tensor:
    base = inputs.base
    assert base is not None
    if not inputs.others:
        return base
    c = contributions(inputs, shared["epsilon"])
    tv = c.tv * c.changed
    merged = ((tv * c.unique) + (tv * c.overlap / c.counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


METHOD = WholeTensorMerge(
    name="ram",
    paper=PAPER,
    params=(EPSILON,),
    fn=_merge,
    base_policy=BasePolicy.REQUIRED,
)
