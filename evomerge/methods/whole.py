"""Methods whose math needs each tensor whole: one function per method, and its input contract.

slerp, nuslerp, multislerp, karcher, model_stock, nearswap, arcee_fusion, sce, ram and
ramplus_tl need whole-tensor (or whole-row) norms, angles, variances, quantiles or top-k; each
is a function of one tensor's inputs, wrapped by `WholeTensorMerge`, which holds the metadata
the registry, the planner and the recipe checks read and checks the sources against mergekit
0.1.5's input contract (base required, optional or ignored; how many inputs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch

from evomerge.methods.base import Paper, ParamSpec, TensorGroup


class BasePolicy(StrEnum):
    """What a method does with the recipe's base_model (mergekit's BasePolicy)."""

    REQUIRED = "required"  # the base must be one of each slice's sources
    OPTIONAL = "optional"  # used if given (e.g. nuslerp: slerp of task vectors)
    IGNORED = "ignored"  # every source is an input alike, the base included (karcher)


@dataclass(frozen=True)
class Inputs:
    """One tensor's inputs as a method sees them: the base (or None) and the others, in order."""

    name: str
    base: torch.Tensor | None
    others: tuple[torch.Tensor, ...]
    other_keys: tuple[int, ...]


MergeFn = Callable[[Inputs, Mapping[str, Any], Mapping[int, Mapping[str, Any]]], torch.Tensor]


@dataclass(frozen=True)
class WholeTensorMerge:
    """A method computed per whole tensor by `fn(inputs, shared, per_source)`."""

    name: str
    paper: Paper | None
    params: tuple[ParamSpec, ...]
    fn: MergeFn
    base_policy: BasePolicy
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int | None = None
    max_non_base: int | None = None
    requires_base: bool = field(init=False)
    max_sources: int | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "requires_base", self.base_policy is BasePolicy.REQUIRED)
        object.__setattr__(self, "max_sources", self.max_inputs)

    def check_source_params(self, params: Mapping[str, Any]) -> None:
        pass  # any value of the declared kind is valid per source

    def check_sources(self, count: int, has_base: bool) -> None:
        """mergekit's InputContract for one slice: `count` sources, the base among them?"""
        if self.base_policy is BasePolicy.IGNORED:
            has_base = False
        if self.base_policy is BasePolicy.REQUIRED and not has_base:
            raise ValueError(f"{self.name} needs the base model among each slice's sources")
        _check_count(self.name, "sources", count, self.min_inputs, self.max_inputs)
        if self.min_non_base is not None or self.max_non_base is not None:
            _check_count(self.name, "sources besides the base", count - int(has_base),
                         self.min_non_base or 0, self.max_non_base)

    def merge(self, group: TensorGroup, shared, per_source, *, mask_seed):
        keys = sorted(group.tensors)  # recipe order, whatever order the mapping was built in
        base = None if self.base_policy is BasePolicy.IGNORED else group.base
        self.check_sources(len(keys), base is not None)
        first = group.tensors[keys[0]]
        if not first.is_floating_point():
            raise ValueError(f"{self.name} needs floating-point tensors ({group.name})")
        others = tuple(k for k in keys if k != base)
        inputs = Inputs(name=group.name,
                        base=None if base is None else group.tensors[base],
                        others=tuple(group.tensors[k] for k in others), other_keys=others)
        return self.fn(inputs, shared, per_source)


def _check_count(name: str, what: str, count: int, minimum: int, maximum: int | None) -> None:
    if count < minimum or (maximum is not None and count > maximum):
        want = (f"exactly {minimum}" if minimum == maximum else
                f"at least {minimum}" if maximum is None else f"{minimum} to {maximum}")
        raise ValueError(f"{name} takes {want} {what} per slice; got {count}")


def weights_of(inputs: Inputs, per_source: Mapping[int, Mapping[str, Any]],
               name: str = "weight") -> list[float]:
    """The non-base sources' values of a per-source parameter, in recipe order."""
    return [per_source[k][name] for k in inputs.other_keys]


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 unless the inputs are float64 (mergekit's accumulation dtype)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


__all__: Sequence[str] = ["BasePolicy", "Inputs", "MergeFn", "WholeTensorMerge", "weights_of",
                          "work_dtype"]
