"""What every merge method is made of: declared parameters, the tensors of one output tensor, the
paper it comes from, and the interface (`MergeMethod`) that the engine calls."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import torch


class ParamScope(StrEnum):
    """Along which axis a parameter is bound (mergekit's ParameterScope)."""

    SHARED = "shared"  # one value per tensor, not per model (normalize, lambda)
    INPUT = "input"  # one value per source model, the base included (linear's weight)
    NON_BASE = "non_base"  # one value per source model other than the base (weight, density)


_REQUIRED = object()


@dataclass(frozen=True)
class ParamSpec:
    name: str
    kind: type  # float, int, bool or str
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
        if self.kind is int:  # as pydantic's lax int: a float without a fraction is accepted
            if isinstance(value, bool) or not isinstance(value, int | float) or (
                    isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"parameter {self.name!r} must be an integer, got {value!r}")
            return int(value)
        if not isinstance(value, str) or (self.choices and value not in self.choices):
            raise ValueError(
                f"parameter {self.name!r} must be one of {list(self.choices)}, got {value!r}"
            )
        return value


@dataclass(frozen=True)
class Paper:
    """Where a method was published (the link mergekit's model cards give)."""

    title: str
    arxiv: str  # arXiv id, e.g. "2306.01708"; "" where the method has no arXiv paper
    link: str = ""  # the reference mergekit gives where there is no arXiv paper

    @property
    def url(self) -> str:
        return self.link or f"https://arxiv.org/abs/{self.arxiv}"


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
    paper: Paper | None  # None: no paper (mergekit's own passthrough)
    params: tuple[ParamSpec, ...]
    requires_base: bool
    max_sources: int | None

    def check_source_params(self, params: Mapping[str, Any]) -> None:
        """Raise ValueError if one source's resolved values for one tensor cannot be merged."""
        ...

    def merge(
        self,
        group: TensorGroup,
        shared: Mapping[str, Any],
        per_source: Mapping[int, Mapping[str, Any]],
        *,
        mask_seed: int,
    ) -> torch.Tensor: ...
