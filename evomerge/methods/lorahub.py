"""lorahub: LoraHub's composition of LoRA adapters, B + s * (sum_i w_i B_i) @ (sum_i w_i A_i).

LoraHub (Huang et al.) combines the factors first and multiplies once, unlike task arithmetic,
which sums the products (sum_i w_i s_i B_i @ A_i). Each adapter's scaling s_i is folded into its
B_i. The adapters that target a tensor must share one rank. Every non-base source must be a LoRA
adapter of the base (models/adapters.py); the engine and the in-place merger hand it the factors
(`FactorGroup`). An evomerge method: mergekit has no lorahub, and the mergekit YAML says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.methods.base import Paper, ParamScope, ParamSpec, TensorGroup


@dataclass(frozen=True)
class FactorGroup(TensorGroup):
    """A TensorGroup with the LoRA factors of its adapter sources (key -> factors, or None
    where the adapter does not target this tensor)."""

    factors: Mapping[int, Any] = field(default_factory=dict)


def compose(base: torch.Tensor, factors: list[tuple[float, Any]], name: str) -> torch.Tensor:
    """base + (sum w_i s_i B_i) @ (sum w_i A_i), in float32 (float64 stays float64)."""
    present = [(w, f) for w, f in factors if f is not None]
    if not present:
        return base
    if len(present) != len(factors):
        raise ValueError(f"lorahub: only some adapters target {name}; LoraHub composes adapters "
                         "of the same modules")
    ranks = {f.rank for _, f in present}
    if len(ranks) != 1:
        raise ValueError(f"lorahub: the adapters of {name} have ranks {sorted(ranks)}; LoraHub "
                         "sums their factors, so they need one rank")
    dt = torch.float64 if base.dtype == torch.float64 else torch.float32
    b = sum(w * f.scaling * f.b.to(dt) for w, f in present)
    a = sum(w * f.a.to(dt) for w, f in present)
    delta = b @ a
    if present[0][1].fan_in_fan_out:
        delta = delta.T
    return (base.to(dt) + delta.to(base.device)).to(base.dtype)


@dataclass(frozen=True)
class LoraHubMerge:
    name: str = "lorahub"
    paper: Paper | None = Paper(
        "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition", "2307.13269")
    params: tuple[ParamSpec, ...] = (ParamSpec("weight", float, ParamScope.NON_BASE),)
    requires_base: bool = True
    max_sources: int | None = None
    needs_factors: bool = True  # the engine hands it a FactorGroup

    def check_source_params(self, params) -> None:
        pass

    def merge(self, group, shared, per_source, *, mask_seed):
        if group.base is None:
            raise ValueError(f"lorahub needs a base model ({group.name})")
        keys = sorted(k for k in group.tensors if k != group.base)
        factors = getattr(group, "factors", None)
        missing = [k for k in keys if factors is None or k not in factors]
        if missing:
            raise ValueError(f"lorahub composes LoRA adapters of the base; source {missing[0]} of "
                             f"{group.name} is a full model")
        return compose(group.tensors[group.base],
                       [(per_source[k]["weight"], factors[k]) for k in keys], group.name)


METHOD = LoraHubMerge()
