"""The task-arithmetic family's shared math: B + lambda * combine_i(w_i * sparsify(x_i - B)).

task_arithmetic, ties, dare_*, breadcrumbs* and della* are instances of one generalized class
(`TaskArithmeticMerge`) that differ in configuration only: sign consensus, sparsifier, defaults
and extra parameters. Each method's own module (ties.py, ...) holds its instance and its paper.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch

from evomerge.methods.base import Paper, ParamScope, ParamSpec
from evomerge.methods.sparsify import RescaleMode, Sparsifier, check_della_density, sparsify


class Consensus(StrEnum):
    SUM = "sum"  # TIES sign election: sign of the summed weighted deltas


GAMMA = ParamSpec("gamma", float, ParamScope.NON_BASE, 0.01)  # breadcrumbs: outliers dropped
EPSILON = ParamSpec("epsilon", float, ParamScope.NON_BASE, 0.15)  # della: keep-probability spread


@dataclass(frozen=True)
class TaskArithmeticMerge:
    """B + lambda * combine_i(w_i * sparsify(x_i - B)), optionally with sign consensus.

    The weighted deltas are built in the tensors' dtype (as mergekit does, so bf16 weights round).
    """

    name: str
    paper: Paper | None
    consensus: Consensus | None
    sparsifier: Sparsifier | None
    normalize_default: bool
    rescale_default: bool
    extras: tuple[ParamSpec, ...] = ()
    requires_base: bool = True
    max_sources: int | None = None
    params: tuple[ParamSpec, ...] = field(init=False)

    def __post_init__(self) -> None:
        params = (
            ParamSpec("weight", float, ParamScope.NON_BASE),
            ParamSpec("density", float, ParamScope.NON_BASE, 1.0),
            ParamSpec("normalize", bool, ParamScope.SHARED, self.normalize_default),
            ParamSpec("rescale", bool, ParamScope.SHARED, self.rescale_default),
            # evomerge's own: how `rescale` restores the scale of a sparsified delta.
            ParamSpec(
                "rescale_mode", str, ParamScope.SHARED, RescaleMode.L1.value,
                choices=tuple(m.value for m in RescaleMode),
            ),
            ParamSpec("lambda", float, ParamScope.SHARED, 1.0),
            # Accepted for mergekit YAML compatibility; it only changes mergekit's mask dtype.
            ParamSpec("int8_mask", bool, ParamScope.SHARED, False),
            *self.extras,
        )
        object.__setattr__(self, "params", params)

    def check_source_params(self, params: Mapping[str, Any]) -> None:
        """One source's resolved values for one tensor (della: density +- its own epsilon)."""
        if self.sparsifier is Sparsifier.DELLA_MAGPRUNE and 0 < params["density"] < 1:
            check_della_density(params["density"], params["epsilon"])

    def merge(self, group, shared, per_source, *, mask_seed):
        if group.base is None:
            raise ValueError(f"{self.name} needs a base model ({group.name})")
        base = group.tensors[group.base]
        # Recipe order, whatever order the mapping was built in: the sums below do not depend on
        # it, and each mask is keyed by its source's key, not by its position.
        keys = sorted(k for k in group.tensors if k != group.base)
        if not keys:
            return base
        deltas = self.task_deltas(group, shared, per_source, mask_seed=mask_seed)
        weights = torch.tensor(
            [per_source[k]["weight"] for k in keys], dtype=deltas.dtype, device=deltas.device
        )
        weights = weights.reshape(len(keys), *([1] * base.dim()))
        deltas.mul_(weights)

        if self.consensus is Consensus.SUM:
            mask = sign_consensus(deltas)
            mixed = (deltas * mask).sum(dim=0)
            divisor = (weights * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if shared["normalize"]:
            mixed /= divisor
        if shared["lambda"] != 1:
            mixed *= shared["lambda"]
        if mixed.dtype == base.dtype:  # in place: base + mixed and mixed + base are the same bits
            return mixed.add_(base)
        return (base + mixed).to(base.dtype)

    def task_deltas(self, group, shared, per_source, *, mask_seed) -> torch.Tensor:
        """The non-base sources' sparsified task vectors, unweighted, stacked in recipe order
        (the masks depend on no weight; search/refine trains the weights on top of them)."""
        base = group.tensors[group.base]
        keys = sorted(k for k in group.tensors if k != group.base)
        extras = [p.name for p in self.extras]
        deltas = base.new_empty((len(keys), *base.shape))
        for row, key in enumerate(keys):
            tensor = group.tensors[key]
            if self.sparsifier is None and tensor.dtype == base.dtype:
                torch.sub(tensor, base, out=deltas[row])  # the same bits, without a temporary
                continue
            delta = tensor - base
            if self.sparsifier is not None:
                delta = sparsify(
                    delta,
                    per_source[key]["density"],
                    self.sparsifier,
                    rescale=RescaleMode(shared["rescale_mode"]) if shared["rescale"] else None,
                    mask_seed=mask_seed,
                    mask_key=f"{key}:{group.name}",
                    **{e: per_source[key][e] for e in extras},
                )
            deltas[row] = delta
        return deltas


def sign_consensus(weighted: torch.Tensor) -> torch.Tensor:
    """TIES's sign election over the stacked weighted deltas: each source's elements that agree
    with the sign of the sum (pruned zeros have sign 0: never counted)."""
    majority = (weighted.sum(dim=0) >= 0).to(weighted.dtype) * 2 - 1
    return weighted.sign() == majority
