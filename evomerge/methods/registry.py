"""Merge methods: metadata (name, declared parameters) plus pure tensor math.

Semantics follow mergekit 0.1.5 (see docs/merge.md and the merge-math reference). The
task-arithmetic family is one generalized class configured by consensus, sparsifier and defaults;
the registry maps names to configured instances.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import torch

from evomerge.methods.sparsify import RescaleMode, Sparsifier, sparsify


class ParamScope(StrEnum):
    """Along which axis a parameter is bound (mergekit's ParameterScope)."""

    SHARED = "shared"  # one value per tensor, not per model (normalize, lambda)
    INPUT = "input"  # one value per source model, the base included (linear's weight)
    NON_BASE = "non_base"  # one value per source model other than the base (weight, density)


_REQUIRED = object()


@dataclass(frozen=True)
class ParamSpec:
    name: str
    kind: type  # float, bool or str
    scope: ParamScope
    default: Any = _REQUIRED
    choices: tuple[str, ...] = ()  # allowed values of a str parameter

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def check(self, value: Any) -> Any:
        """Validate one resolved scalar; numbers become float, as mergekit's validation does."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"parameter {self.name!r} must be true or false, got {value!r}")
            return value
        if self.kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"parameter {self.name!r} must be a number, got {value!r}")
            return float(value)
        if not isinstance(value, str) or (self.choices and value not in self.choices):
            raise ValueError(
                f"parameter {self.name!r} must be one of {list(self.choices)}, got {value!r}"
            )
        return value


@dataclass(frozen=True)
class TensorGroup:
    """The inputs of one output tensor: source key -> tensor, in recipe order.

    `keys` are stable identifiers of the sources (their index in the slice's sources), used to key
    DARE/DELLA masks; `base` is the key of the base model or None.
    """

    name: str
    tensors: Mapping[int, torch.Tensor]
    base: int | None = None


class MergeMethod(Protocol):
    name: str
    params: tuple[ParamSpec, ...]
    requires_base: bool
    max_sources: int | None

    def merge(
        self,
        group: TensorGroup,
        shared: Mapping[str, Any],
        per_source: Mapping[int, Mapping[str, Any]],
        *,
        mask_seed: int,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class LinearMerge:
    """R = sum_i w_i x_i, divided by sum_i w_i if normalize; accumulated in float32."""

    name: str = "linear"
    params: tuple[ParamSpec, ...] = (
        ParamSpec("weight", float, ParamScope.INPUT),
        ParamSpec("normalize", bool, ParamScope.SHARED, True),
    )
    requires_base: bool = False
    max_sources: int | None = None

    def merge(self, group, shared, per_source, *, mask_seed):
        keys = list(group.tensors)
        first = group.tensors[keys[0]]
        if not first.is_floating_point():
            raise ValueError(f"linear merging needs floating-point tensors ({group.name})")
        # mergekit accumulates in float32 (float64 stays float64) and casts back at the end.
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        weights = torch.tensor([per_source[k]["weight"] for k in keys], dtype=dtype)
        result = torch.zeros_like(first, dtype=dtype)
        for k, w in zip(keys, weights.unbind(0), strict=True):
            result.addcmul_(group.tensors[k], w.to(first.device))
        if shared["normalize"]:
            denominator = weights.sum()
            if denominator == 0:
                raise ValueError(
                    f"linear: the weights sum to 0 for {group.name} (normalize: true)"
                )
            result.div_(denominator.to(first.device))
        return result.to(first.dtype)


@dataclass(frozen=True)
class PassthroughMerge:
    """Copies the tensor of the single source (layer stacking with `slices:`)."""

    name: str = "passthrough"
    params: tuple[ParamSpec, ...] = (ParamSpec("scale", float, ParamScope.INPUT, None),)
    requires_base: bool = False
    max_sources: int | None = 1

    def merge(self, group, shared, per_source, *, mask_seed):
        ((key, tensor),) = group.tensors.items()
        scale = per_source[key].get("scale")
        return tensor if scale is None else tensor * scale


class Consensus(StrEnum):
    SUM = "sum"  # TIES sign election: sign of the summed weighted deltas


@dataclass(frozen=True)
class TaskArithmeticMerge:
    """B + lambda * combine_i(w_i * sparsify(x_i - B)), optionally with sign consensus.

    task_arithmetic, ties, dare_*, breadcrumbs*, della* are instances with different settings.
    The weighted deltas are built in the tensors' dtype (as mergekit does, so bf16 weights round).
    """

    name: str
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

    def merge(self, group, shared, per_source, *, mask_seed):
        if group.base is None:
            raise ValueError(f"{self.name} needs a base model ({group.name})")
        base = group.tensors[group.base]
        keys = [k for k in group.tensors if k != group.base]
        if not keys:
            return base
        extras = [p.name for p in self.extras]
        deltas = base.new_empty((len(keys), *base.shape))
        for row, key in enumerate(keys):
            delta = group.tensors[key] - base
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
        weights = torch.tensor(
            [per_source[k]["weight"] for k in keys], dtype=deltas.dtype, device=deltas.device
        )
        weights = weights.reshape(len(keys), *([1] * base.dim()))
        deltas.mul_(weights)

        if self.consensus is Consensus.SUM:
            majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
            mask = deltas.sign() == majority  # pruned zeros have sign 0: never counted
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
        return (base + mixed).to(base.dtype)


_GAMMA = ParamSpec("gamma", float, ParamScope.NON_BASE, 0.01)
_EPSILON = ParamSpec("epsilon", float, ParamScope.NON_BASE, 0.15)
_MAG, _RAND = Sparsifier.MAGNITUDE, Sparsifier.RANDOM
_OUT, _DELLA = Sparsifier.MAGNITUDE_OUTLIERS, Sparsifier.DELLA_MAGPRUNE
_SUM = Consensus.SUM

_METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        LinearMerge(),
        PassthroughMerge(),
        TaskArithmeticMerge("task_arithmetic", None, None, False, False),
        TaskArithmeticMerge("ties", _SUM, _MAG, True, False),
        TaskArithmeticMerge("dare_ties", _SUM, _RAND, False, True),
        TaskArithmeticMerge("dare_linear", None, _RAND, False, True),
        TaskArithmeticMerge("breadcrumbs", None, _OUT, False, False, (_GAMMA,)),
        TaskArithmeticMerge("breadcrumbs_ties", _SUM, _OUT, False, False, (_GAMMA,)),
        TaskArithmeticMerge("della", _SUM, _DELLA, True, True, (_EPSILON,)),
        TaskArithmeticMerge("della_linear", None, _DELLA, False, True, (_EPSILON,)),
    )
}


def method_names() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> MergeMethod:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown merge_method {name!r}; valid: {', '.join(method_names())}"
        ) from None


def param_spec(method: MergeMethod, name: str) -> ParamSpec | None:
    return next((p for p in method.params if p.name == name), None)


def uses_random_masks(method: MergeMethod) -> bool:
    return getattr(method, "sparsifier", None) in (Sparsifier.RANDOM, Sparsifier.DELLA_MAGPRUNE)


def merge_group(
    method: MergeMethod,
    group: TensorGroup,
    shared: Mapping[str, Any],
    per_source: Mapping[int, Mapping[str, Any]],
    *,
    mask_seed: int = 0,
) -> torch.Tensor:
    """Merge one tensor; non-float tensors (integer buffers) are copied from the first source."""
    first = next(iter(group.tensors.values()))
    if not first.is_floating_point():
        return group.tensors[group.base] if group.base is not None else first
    return method.merge(group, shared, per_source, mask_seed=mask_seed)


__all__: Sequence[str] = [
    "Consensus",
    "LinearMerge",
    "MergeMethod",
    "ParamScope",
    "ParamSpec",
    "PassthroughMerge",
    "TaskArithmeticMerge",
    "TensorGroup",
    "get_method",
    "merge_group",
    "method_names",
    "param_spec",
    "uses_random_masks",
]
