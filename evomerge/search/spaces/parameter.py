"""Search spaces: which merge parameters are searched, at which granularity, within which bounds.

A space is a YAML file in ``search_spaces/`` validated by ``SearchSpace``; it names no models, so
one space serves any set of sources. The codec (``codec.py``) turns a space plus the sources'
layout into genes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.methods.registry import ParamScope, get_method, param_spec

# Valid ranges of searchable parameters (low inclusive?, high inclusive?), per merge-math.md.
# density: magnitude/breadcrumbs keep int(d*N) elements, so d must stay in (0, 1]; della needs
# d +- epsilon strictly inside (0, 1), checked against the epsilon that applies below.
PARAMETER_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "weight": (-math.inf, math.inf, True, True),
    "density": (0.0, 1.0, False, True),
    "gamma": (0.0, 1.0, True, False),
    "epsilon": (0.0, 0.5, False, False),
    "lambda": (-math.inf, math.inf, True, True),
    "t": (-math.inf, math.inf, True, True),  # slerp: 0..1 interpolates, outside extrapolates
    "select_topk": (0.0, 1.0, False, True),  # sce: the fraction of elements kept
    "rank_fraction": (0.0, 1.0, False, True),  # tsv: the share of each task's 1/T of the rank
    "common_space_fraction": (0.0, 1.0, True, True),  # iso_cts: the common subspace's share
}

# mergekit-evolve's genome options and how a search space says them.
MERGEKIT_EVOLVE_KEYS = {
    "allow_negative_weights": "give the weight a negative low bound (weight: {low: -1.0, "
                              "high: 1.0})",
    "normalize": "hold it fixed (fixed: {normalize: true}) or search it as a global parameter",
    "smooth": "per-layer smoothing (gradients over the layers) is not a genome option of "
              "evomerge; search per layer group (granularity.layers_per_group) instead",
    "filters": "the attention/MLP split is granularity.split_attn_mlp: true",
    "layer_granularity": "it is granularity.layers_per_group",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamRange(_Strict):
    """Bounds and starting value of one searched parameter. ``init`` may be ``"1/n"`` (one over
    the number of source models, mergekit-evolve's start) or a number inside the bounds."""

    # finite: a gene maps linearly onto [low, high], which an infinite bound makes nan
    low: float = Field(allow_inf_nan=False)
    high: float = Field(allow_inf_nan=False)
    init: float | Literal["1/n"] | None = None  # default: the middle (Sakana: 0.5 in [0, 1])

    @model_validator(mode="after")
    def _check(self) -> ParamRange:
        if not self.low < self.high:
            raise ValueError(f"low must be < high (got low={self.low}, high={self.high})")
        if isinstance(self.init, float) and not self.low <= self.init <= self.high:
            raise ValueError(f"init={self.init} lies outside [{self.low}, {self.high}]")
        return self

    def start(self, n_sources: int) -> float:
        if self.init is None:
            return (self.low + self.high) / 2
        value = 1.0 / n_sources if self.init == "1/n" else float(self.init)
        return min(max(value, self.low), self.high)


class Granularity(_Strict):
    """How many values each source gets per parameter.

    ``layers_per_group``: one value per group of k consecutive layers (1 = per layer), or ``all``.
    ``split_attn_mlp``: separate values for the attention and the MLP half of each layer group.
    ``embeddings``: ``own`` gives the embeddings and the output head (final norm + lm_head) groups
    of their own (one group when the embeddings are tied); ``with_layers`` lets them follow the
    first and last layer group, as mergekit does by default.
    ``tensors``: one value per tensor of each layer group (q_proj, k_proj, ... of layers 0-1) and
    per embedding and head tensor: the finest groups a recipe's filters express (M2N2's split
    points fall between tensors).
    """

    layers_per_group: int | Literal["all"] = "all"
    split_attn_mlp: bool = False
    embeddings: Literal["own", "with_layers"] = "own"
    tensors: bool = False

    @model_validator(mode="after")
    def _tensors(self) -> Granularity:
        if self.tensors and self.split_attn_mlp:
            raise ValueError("tensors: per-tensor groups already split attention and MLP; set split_attn_mlp: false")
        if self.tensors and self.embeddings != "own":
            raise ValueError("tensors: the embedding and head tensors get groups of their own; set embeddings: own")
        return self

    @field_validator("layers_per_group")
    @classmethod
    def _positive(cls, v):
        if v != "all" and v < 1:
            raise ValueError(f"layers_per_group must be >= 1 or 'all' (got {v})")
        return v


class SearchSpace(_Strict):
    """A search space file: the merge method, searched parameters and their granularity."""

    method: str
    parameters: dict[str, ParamRange] = Field(description="searched per-source parameters")
    global_parameters: dict[str, ParamRange] = Field(default_factory=dict,
                                                     description="searched method-wide parameters")
    layer_parameters: dict[str, ParamRange] = Field(
        default_factory=dict,
        description="method-wide parameters searched per layer group (slerp's t), with the "
                    "granularity's groups")
    fixed: dict[str, float | bool | int | str] = Field(default_factory=dict,
                                                       description="method-wide parameters held fixed")
    granularity: Granularity = Field(default_factory=Granularity)
    sigma0: float = Field(1 / 6, gt=0, le=1, description="initial step size, in units of each parameter's range")

    @model_validator(mode="before")
    @classmethod
    def _mergekit_evolve_keys(cls, data):
        """mergekit-evolve's genome options, refused with the way to say them here."""
        if isinstance(data, dict):
            for key, how in MERGEKIT_EVOLVE_KEYS.items():
                if key in data:
                    raise ValueError(f"{key}: a mergekit-evolve genome option; here {how}")
        return data

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        get_method(v)  # raises ValueError naming the valid methods
        return v

    @model_validator(mode="after")
    def _check_parameters(self) -> SearchSpace:
        method = get_method(self.method)
        declared = {p.name: p for p in method.params}
        per_model_of = {n: p.scope != ParamScope.SHARED for n, p in declared.items()}
        if not self.parameters and not self.global_parameters and not self.layer_parameters:
            numeric = [p.name for p in method.params if p.kind in (float, int)]
            if not numeric:
                raise ValueError(f"parameters: {self.method} has no numeric parameter to search "
                                 f"(its options, e.g. {', '.join(p.name for p in method.params)},"
                                 " are set with `fixed:`); search another method")
            raise ValueError("parameters: a search space must search at least one parameter")
        both = set(self.global_parameters) & set(self.layer_parameters)
        if both:
            raise ValueError(f"layer_parameters.{min(both)}: also in global_parameters")
        for where, block, per_model in (("parameters", self.parameters, True),
                                        ("global_parameters", self.global_parameters, False),
                                        ("layer_parameters", self.layer_parameters, False)):
            for name, rng in block.items():
                if name not in declared:
                    raise ValueError(f"{where}.{name}: {self.method} has no parameter {name!r} "
                                     f"(it has {', '.join(sorted(declared)) or 'none'})")
                if per_model_of[name] != per_model:
                    kind = "per-model" if per_model_of[name] else "global"
                    raise ValueError(f"{where}.{name}: {name!r} is a {kind} parameter of {self.method}")
                self._check_range(f"{where}.{name}", name, rng)
        for name in self.fixed:
            if name not in declared or per_model_of[name]:
                raise ValueError(f"fixed.{name}: {self.method} has no global parameter {name!r}")
            if name in self.global_parameters or name in self.layer_parameters:
                raise ValueError(f"fixed.{name}: {name!r} is both fixed and searched")
            spec = declared[name]
            try:
                spec.check(self.fixed[name])
            except ValueError as err:
                raise ValueError(f"fixed.{name}: {err}") from None
        return self

    def _check_range(self, where: str, name: str, rng: ParamRange) -> None:
        lo, hi, lo_incl, hi_incl = PARAMETER_RANGES.get(name, (-math.inf, math.inf, True, True))
        epsilon = param_spec(get_method(self.method), "epsilon")
        if name == "density" and epsilon is not None:
            # della: every source's density d needs d +- its own epsilon inside (0, 1). Epsilon
            # is a per-model parameter: searched, any source's can reach the range's high end;
            # else every source has the method's default.
            searched = self.parameters.get("epsilon")
            eps = searched.high if searched is not None else float(epsilon.default)
            lo, hi, lo_incl, hi_incl = eps, 1.0 - eps, False, False
            name = f"density (epsilon up to {eps:g})"
        if rng.low < lo or (rng.low == lo and not lo_incl) or rng.high > hi or (rng.high == hi and not hi_incl):
            interval = f"{'[' if lo_incl else '('}{lo}, {hi}{']' if hi_incl else ')'}"
            raise ValueError(f"{where}: bounds [{rng.low}, {rng.high}] leave {self.method}'s valid range "
                             f"{interval} for {name}")

    @classmethod
    def load(cls, path: str | Path) -> SearchSpace:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"search space file {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a search space is a YAML mapping")
        return cls.model_validate(data)
