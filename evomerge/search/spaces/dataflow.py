"""The DFS search space (``kind: dfs``): which paths through the sources' layers are searched.

Sakana's encoding: an indicator array over M * r slots (every layer of every source model,
repeated r times, in order); slot t keeps its layer when its gene says so, and the kept slots in
order form the path. A scaling matrix W (M x M) scales the input of layer j when it runs right
after layer i; ``per_layer`` (one scale per entered layer) and ``none`` are smaller choices for
large M. Model A is the first source model: its first and last layers may be fixed as the path's
ends, and its layers start likely in the first repeat, so the search starts near model A.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScaleSpace(_Strict):
    """Step scales: searched on a log scale in [low, high] (init maps to the genes' start)."""

    param: Literal["matrix", "per_layer", "none"] = Field(
        "matrix", description="matrix: W_ij per (previous layer, layer), M x M genes; per_layer: "
        "one per entered layer, M genes; none: every scale is 1")
    low: float = Field(0.5, gt=0, allow_inf_nan=False)
    high: float = Field(2.0, gt=0, allow_inf_nan=False)
    init: float = 1.0

    @model_validator(mode="after")
    def _check(self) -> ScaleSpace:
        if not self.low < self.high:
            raise ValueError(f"low must be < high (got low={self.low}, high={self.high})")
        if not self.low <= self.init <= self.high:
            raise ValueError(f"init={self.init} lies outside [{self.low}, {self.high}]")
        return self

    def value(self, x: float) -> float:
        lo, hi = math.log(self.low), math.log(self.high)
        return math.exp(lo + x * (hi - lo))

    def position(self, value: float) -> float:
        lo, hi = math.log(self.low), math.log(self.high)
        return (math.log(value) - lo) / (hi - lo)


class IndicatorInit(_Strict):
    """Starting indicator genes (a slot is kept when its gene is > 0.5)."""

    model_a: float = Field(0.7, ge=0, le=1, description="model A's layers in the first repeat")
    other: float = Field(0.3, ge=0, le=1, description="every other slot")


class DfsSpace(_Strict):
    kind: Literal["dfs"]
    repeats: int = Field(3, ge=1, le=16, description="r: each source layer gets r slots (paper: 3)")
    fix_ends: bool = Field(True, description="model A's first and last layers start and end every path")
    max_path_length: int | None = Field(None, ge=1, description="longer paths keep their first steps "
                                        "(and the fixed end); default: no bound beyond the slots")
    # At most the fold's bound (fold.MAX_SCALE_PRODUCT): every searched path must be exportable.
    max_scale_product: float = Field(100.0, gt=1, le=1e4, description="every prefix product of the "
                                     "scales stays in [1/B, B]; a step that would leave it is clipped")
    scale: ScaleSpace = Field(default_factory=ScaleSpace)
    init: IndicatorInit = Field(default_factory=IndicatorInit)
    sigma0: float = Field(0.15, gt=0, le=1, description="initial step, in units of each gene's range")

    @model_validator(mode="after")
    def _check(self) -> DfsSpace:
        if self.fix_ends and self.max_path_length is not None and self.max_path_length < 2:
            raise ValueError("max_path_length must be >= 2 when fix_ends holds model A's first and "
                             "last layers")
        if self.init.model_a <= 0.5:
            raise ValueError(f"init.model_a={self.init.model_a}: a slot is kept when its gene is > 0.5, "
                             "and the search starts from model A's layers")
        bound = self.max_scale_product
        if self.scale.param != "none" and not 1 / bound <= self.scale.init <= bound:
            raise ValueError(f"scale.init={self.scale.init} leaves max_scale_product's [1/{bound}, {bound}]")
        return self

    @classmethod
    def load(cls, path: str | Path) -> DfsSpace:
        data = yaml.safe_load(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a search space is a YAML mapping")
        return cls.model_validate(data)
