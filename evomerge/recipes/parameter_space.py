"""Merge recipes: mergekit-compatible YAML, frozen, validated on load, identified by a hash.

A recipe is mergekit's `models:` form (one implied slice over all layers) or its `slices:` form,
plus evomerge's `mask_seed` (the key of DARE/DELLA masks). Parameter values are a scalar, a
gradient list (interpolated over the layers of an output slice) or a list of {filter, value}
entries (the first entry whose filter matches the tensor name wins). Precedence, highest first:
slices.*.sources.parameters (= models.*.parameters) > slices.*.parameters > global parameters.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from evomerge.core.errors import RecipeError
from evomerge.core.validation import format_errors
from evomerge.methods.registry import MergeMethod, ParamScope, get_method, param_spec

Scalar = bool | int | float | str
DType = Literal["float32", "float16", "bfloat16", "float64"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _is_scalar(v: Any) -> bool:
    return isinstance(v, bool | int | float | str) and not (
        isinstance(v, float) and not math.isfinite(v)
    )


def _parse_setting(value: Any) -> Any:
    """Check one parameter value's shape; filter entries become {"filter", "value"} dicts."""
    if _is_scalar(value):
        return value
    if isinstance(value, dict):  # a single {filter, value} entry, as mergekit accepts
        value = [value]
    if isinstance(value, list) and value:
        if all(_is_scalar(v) for v in value):
            return list(value)
        if all(isinstance(v, dict) for v in value):
            entries = []
            for entry in value:
                unknown = set(entry) - {"filter", "value"}
                if unknown or "value" not in entry:
                    raise ValueError(
                        "a filter entry has the keys 'filter' (optional) and 'value'; got "
                        f"{sorted(entry)}"
                    )
                if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                    raise ValueError(f"a filter must be a string, got {entry['filter']!r}")
                inner = entry["value"]
                if not (_is_scalar(inner) or (
                    isinstance(inner, list) and inner and all(_is_scalar(v) for v in inner)
                )):
                    raise ValueError(f"a filter entry's value must be a scalar or a gradient "
                                     f"list, got {inner!r}")
                entries.append({"filter": entry.get("filter"), "value": inner})
            return entries
    raise ValueError(
        "a parameter value is a finite scalar, a non-empty gradient list of scalars, or a list "
        f"of {{filter, value}} entries; got {value!r}"
    )


class _WithParameters(_Frozen):
    parameters: dict[str, Any] | None = None

    @field_validator("parameters", mode="before")
    @classmethod
    def _check_parameters(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError(f"parameters must be a mapping, got {value!r}")
        out = {}
        for name, setting in value.items():
            try:
                out[str(name)] = _parse_setting(setting)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
        return out


class ModelEntry(_WithParameters):
    model: str


class SliceSource(_WithParameters):
    model: str
    layer_range: tuple[int, int]

    @field_validator("layer_range")
    @classmethod
    def _check_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] < value[1]:
            raise ValueError(f"layer_range must satisfy 0 <= start < end, got {list(value)}")
        return value

    @property
    def num_layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


class OutputSlice(_WithParameters):
    sources: list[SliceSource]

    @field_validator("sources")
    @classmethod
    def _check_sources(cls, value: list[SliceSource]) -> list[SliceSource]:
        if not value:
            raise ValueError("a slice needs at least one source")
        lengths = {s.num_layers for s in value}
        if len(lengths) > 1:
            raise ValueError(
                f"all sources of a slice must span the same number of layers, got "
                f"{[list(s.layer_range) for s in value]}"
            )
        return value

    @property
    def num_layers(self) -> int:
        return self.sources[0].num_layers


def same_model(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and os.path.normpath(a) == os.path.normpath(b)


class Recipe(_WithParameters):
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None
    dtype: DType | None = None
    out_dtype: DType | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    mask_seed: int = 0

    # --- validation ---------------------------------------------------------------------------

    @field_validator("merge_method")
    @classmethod
    def _check_method(cls, value: str) -> str:
        get_method(value)  # raises ValueError listing the valid names
        return value

    @field_validator("tokenizer_source")
    @classmethod
    def _check_tokenizer_source(cls, value: str | None) -> str | None:
        if value == "union":
            raise ValueError(
                "'union' is not supported by evomerge; use 'base' or the path of one model"
            )
        return value

    @field_validator("chat_template")
    @classmethod
    def _check_chat_template(cls, value: str | None) -> str | None:
        if value is not None and value != "auto" and "{" not in value:
            raise ValueError(
                "give the Jinja template text itself, or 'auto' (the most common template of "
                f"the sources); named templates are not bundled: {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _check_structure(self) -> Recipe:
        if bool(self.models) == bool(self.slices):
            raise ValueError("exactly one of 'models' or 'slices' must be given (non-empty)")
        method = get_method(self.merge_method)
        if method.requires_base and not self.base_model:
            raise ValueError(f"base_model: merge_method {self.merge_method!r} needs a base_model")
        if method.max_sources is not None:
            for i, s in enumerate(self.output_slices_unresolved()):
                if len(s) > method.max_sources:
                    raise ValueError(
                        f"{'slices' if self.slices else 'models'}: {self.merge_method} takes at "
                        f"most {method.max_sources} source(s) per slice; slice {i} has {len(s)}"
                    )
        check_sources = getattr(method, "check_sources", None)
        if check_sources is not None:  # mergekit's input contract (how many sources, the base)
            for i, s in enumerate(self.output_slices_unresolved()):
                has_base = bool(self.base_model) and any(same_model(self.base_model, n)
                                                         for n in s)
                try:
                    check_sources(len(s), has_base)
                except ValueError as err:
                    where = f"slices.{i}" if self.slices else "models"
                    raise ValueError(f"{where}: {err}") from None
        for where, params, per_model in self._parameter_blocks():
            _check_block(method, self.merge_method, where, params, per_model)
        return self

    def output_slices_unresolved(self) -> list[list[str]]:
        if self.slices:
            return [[src.model for src in s.sources] for s in self.slices]
        names = [m.model for m in self.models or []]
        if self.base_model and not any(same_model(self.base_model, n) for n in names):
            names.append(self.base_model)
        return [names]

    def _parameter_blocks(self) -> Iterator[tuple[str, dict[str, Any] | None, bool]]:
        yield "parameters", self.parameters, False
        for i, m in enumerate(self.models or []):
            yield f"models.{i}.parameters", m.parameters, True
        for i, s in enumerate(self.slices or []):
            yield f"slices.{i}.parameters", s.parameters, False
            for j, src in enumerate(s.sources):
                yield f"slices.{i}.sources.{j}.parameters", src.parameters, True

    # --- mergekit's normal form ---------------------------------------------------------------

    def output_slices(self, num_layers: int) -> list[OutputSlice]:
        """The recipe in slices form, as mergekit normalizes it.

        `models:` becomes one slice over layers [0, num_layers) whose sources carry the models'
        parameters; a base model not listed among the models is appended as a source with no
        parameters.
        """
        if self.slices:
            return list(self.slices)
        sources = [
            SliceSource(model=m.model, layer_range=(0, num_layers), parameters=m.parameters)
            for m in self.models or []
        ]
        if self.base_model and not any(same_model(self.base_model, s.model) for s in sources):
            sources.append(SliceSource(model=self.base_model, layer_range=(0, num_layers)))
        return [OutputSlice(sources=sources)]

    def referenced_models(self) -> list[str]:
        """Every model the recipe reads, base first, each once (in order of appearance)."""
        out: list[str] = []
        names = [self.base_model] if self.base_model else []
        names += [m.model for m in self.models or []]
        names += [src.model for s in self.slices or [] for src in s.sources]
        if self.tokenizer_source not in (None, "base"):
            names.append(self.tokenizer_source)
        for name in names:
            if not any(same_model(name, o) for o in out):
                out.append(name)
        return out

    # --- identity and YAML --------------------------------------------------------------------

    def canonical_json(self) -> str:
        """Sorted keys, no None fields, numbers of float parameters as floats (1 == 1.0)."""
        data = self.model_dump(mode="json", exclude_none=True)
        return json.dumps(_canonical(data), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False, allow_nan=False)

    def hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        if data.get("mask_seed") == 0 and not _needs_mask_seed(self):
            data.pop("mask_seed")  # keeps plain mergekit recipes mergekit-clean
        return yaml.dump(_parameters_last(data), Dumper=_Dumper, sort_keys=False,
                         allow_unicode=True)

    @classmethod
    def from_yaml(cls, text: str, source: str = "<recipe>") -> Recipe:
        return cls.from_dict(recipe_yaml_dict(text, source), source)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<recipe>") -> Recipe:
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise RecipeError(f"{source}: {format_errors(err, cls)}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        return cls.from_yaml(read_recipe_file(path), str(path))

    def save(self, path: str | os.PathLike) -> None:
        from evomerge.core.io import atomic_write_text

        atomic_write_text(path, self.to_yaml())


def read_recipe_file(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise RecipeError(f"cannot read recipe {path}: {err.strerror or err}") from None


def recipe_yaml_dict(text: str, source: str) -> dict:
    """A recipe file's YAML mapping (safe_load), with errors that name the file."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{source}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping, got {type(data).__name__}")
    return data


def _parameters_last(data: Any) -> Any:
    """`model:` before its `parameters:`, as people write recipes."""
    if isinstance(data, dict):
        out = {k: _parameters_last(v) for k, v in data.items() if k != "parameters"}
        if "parameters" in data:
            out["parameters"] = data["parameters"]
        return out
    if isinstance(data, list):
        return [_parameters_last(v) for v in data]
    return data


def _needs_mask_seed(recipe: Recipe) -> bool:
    from evomerge.methods.registry import uses_random_masks

    return uses_random_masks(get_method(recipe.merge_method))


def _check_block(method: MergeMethod, method_name: str, where: str,
                 params: dict[str, Any] | None, per_model: bool) -> None:
    for name, setting in (params or {}).items():
        spec = param_spec(method, name)
        if spec is None:
            valid = ", ".join(p.name for p in method.params)
            raise ValueError(
                f"{where}.{name}: unknown parameter for merge_method {method_name!r} "
                f"(valid: {valid})"
            )
        if per_model and spec.scope is ParamScope.SHARED:
            raise ValueError(
                f"{where}.{name}: {name!r} applies to the whole tensor, not to one model; "
                "put it under the global or the slice parameters"
            )
        leaves = _leaves(setting)
        for leaf in leaves:
            try:
                spec.check(leaf)
            except ValueError as err:
                raise ValueError(f"{where}.{name}: {err}") from None


def _leaves(setting: Any) -> list[Any]:
    if isinstance(setting, list):
        out: list[Any] = []
        for v in setting:
            out += _leaves(v["value"]) if isinstance(v, dict) else [v]
        return out
    return [setting]


def _canonical(data: Any, in_params: bool = False) -> Any:
    if isinstance(data, dict):
        return {k: _canonical(v, in_params or k == "parameters") for k, v in data.items()}
    if isinstance(data, list):
        return [_canonical(v, in_params) for v in data]
    if in_params and isinstance(data, int) and not isinstance(data, bool):
        return float(data)
    return data


class _Dumper(yaml.SafeDumper):
    """Lists of numbers in flow style ([0.3, 0.9]), as mergekit writes them."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.SequenceNode:
    flow = bool(data) and all(_is_scalar(v) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


# --- parameter resolution -----------------------------------------------------------------------


def layer_t(index: int, num_layers: int) -> float:
    """Position of layer `index` in an output slice of `num_layers` layers (mergekit's t)."""
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Scalar | None:
    """A parameter's value for one tensor at slice position t; None falls through.

    Gradient lists of numbers interpolate linearly over t; other lists (booleans, strings) pick
    the entry at int(t * (n-1)). A filter list returns the first entry whose filter is None, "*"
    or a substring of the tensor name.
    """
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if isinstance(setting[0], dict):
        for entry in setting:
            f = entry["filter"]
            if f is None or f == "*" or (tensor_name and f in tensor_name):
                return evaluate_setting(entry["value"], tensor_name, t)
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in setting):
        return setting[int(t * (len(setting) - 1))]
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]


def parameter_scopes(recipe: Recipe, out_slice: OutputSlice,
                     source_index: int | None) -> list[dict[str, Any] | None]:
    """Parameter blocks in precedence order for one source (None: the shared parameters).

    mergekit reads the parameters of every source of the slice naming the same model.
    """
    scopes: list[dict[str, Any] | None] = []
    if source_index is not None:
        model = out_slice.sources[source_index].model
        scopes += [s.parameters for s in out_slice.sources if same_model(s.model, model)]
    scopes += [out_slice.parameters, recipe.parameters]
    return scopes


def resolve_parameter(scopes: list[dict[str, Any] | None], name: str, tensor_name: str,
                      t: float) -> Scalar | None:
    for scope in scopes:
        if scope is not None and name in scope:
            value = evaluate_setting(scope[name], tensor_name, t)
            if value is not None:
                return value
    return None
