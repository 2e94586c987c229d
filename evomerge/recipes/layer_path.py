"""The layer-order recipe: a path of steps (source model, layer index, input scale).

Step t runs layer ``layer`` of ``model`` on ``hidden * scale`` (Sakana's released models store the
same as ``input_layers`` / ``input_scales``). The embeddings, the head (final norm + lm_head) and
the tokenizer come from the models named in ``embeddings``, ``head`` and ``tokenizer_source``.

    path:
      - {model: zoo/spec_rev, layer: 0, scale: 1.0}
      - {model: zoo/spec_sub, layer: 2, scale: 0.8}
      - {model: zoo/spec_rev, layer: 3, scale: 1.1}
    embeddings: zoo/spec_rev
    head: zoo/spec_rev
    dtype: float32

A file may also hold several YAML documents (a staged recipe, as ``mergekit-multi`` reads them):
every document but the last has a ``name``, and later documents use that name as a model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.core.validation import format_errors
from evomerge.recipes.parameter_space import (
    DType,
    Recipe,
    RecipeError,
    read_recipe_file,
    recipe_yaml_dict,
)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PathStep(_Frozen):
    model: str
    layer: int = Field(ge=0)
    scale: float = 1.0

    @field_validator("scale")
    @classmethod
    def _positive(cls, v: float) -> float:
        # Norms are scale invariant only for c > 0 (n(-x) = -n(x)): folding needs positive scales.
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"a step's scale must be a finite number > 0, got {v}")
        return float(v)


class PathRecipe(_Frozen):
    path: list[PathStep] = Field(min_length=1)
    embeddings: str = Field(description="model whose embeddings feed the first step")
    head: str = Field(description="model whose final norm and lm_head read the last step")
    tokenizer_source: str | None = Field(None, description="default: the embeddings' model")
    dtype: DType | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_ends(cls, data: Any) -> Any:
        # Defaults follow mergekit's passthrough: embeddings from the first step, head from the last.
        if isinstance(data, dict) and data.get("path") and isinstance(data["path"], list):
            first, last = data["path"][0], data["path"][-1]
            data = dict(data)
            if isinstance(first, dict):
                data.setdefault("embeddings", first.get("model"))
            if isinstance(last, dict):
                data.setdefault("head", last.get("model"))
        return data

    # --- what it reads --------------------------------------------------------------------------
    def referenced_models(self) -> list[str]:
        """Every model the recipe reads, each once, in order of appearance."""
        out: list[str] = []
        for name in (self.embeddings, *(s.model for s in self.path), self.head,
                     self.tokenizer_source):
            if name is not None and not any(_same(name, o) for o in out):
                out.append(name)
        return out

    def scale_products(self) -> list[float]:
        """prod_{k <= j} scale_k for each step j: the factor each step's stream carries."""
        out, p = [], 1.0
        for s in self.path:
            p *= s.scale
            out.append(p)
        return out

    # --- identity and YAML ----------------------------------------------------------------------
    def canonical_json(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)

    def hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<recipe>") -> PathRecipe:
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise RecipeError(f"{source}: {format_errors(err, cls)}") from None

    @classmethod
    def from_yaml(cls, text: str, source: str = "<recipe>") -> PathRecipe:
        data = recipe_yaml_dict(text, source)
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PathRecipe:
        return cls.from_yaml(read_recipe_file(path), str(path))


def _same(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


class _Dumper(yaml.SafeDumper):
    """Each step on one line ({model, layer, scale}), as people write paths."""


def _represent_dict(dumper: yaml.SafeDumper, data: dict) -> yaml.MappingNode:
    flow = set(data) <= {"model", "layer", "scale"} and "layer" in data
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=flow)


_Dumper.add_representer(dict, _represent_dict)


# --- any recipe, one or several documents ------------------------------------------------------

AnyRecipe = Recipe | PathRecipe


def recipe_from_dict(data: dict[str, Any], source: str = "<recipe>") -> AnyRecipe:
    """A layer-order recipe if it has a ``path``, else a mergekit-style merge recipe."""
    if "path" in data:
        return PathRecipe.from_dict(data, source)
    return Recipe.from_dict(data, source)


def load_recipe(path: str | os.PathLike) -> AnyRecipe:
    """One recipe file of either kind (the last document of a staged file)."""
    return load_stages(path)[-1][1]


def load_stages(path: str | os.PathLike) -> list[tuple[str | None, AnyRecipe]]:
    """The documents of a recipe file: (name, recipe); only the last may be unnamed."""
    return stages_from_yaml(read_recipe_file(path), str(path))


def stages_from_yaml(text: str, source: str = "<recipe>") -> list[tuple[str | None, AnyRecipe]]:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise RecipeError(f"{source}: not valid YAML: {err}") from None
    if not docs:
        raise RecipeError(f"{source}: no recipe in the file")
    out: list[tuple[str | None, AnyRecipe]] = []
    for i, doc in enumerate(docs):
        where = f"{source} (document {i + 1})" if len(docs) > 1 else source
        if not isinstance(doc, dict):
            raise RecipeError(f"{where}: a recipe is a YAML mapping, got {type(doc).__name__}")
        doc = dict(doc)
        name = doc.pop("name", None)
        if len(docs) > 1 and i < len(docs) - 1 and not name:
            raise RecipeError(f"{where}: every document but the last needs a `name` that later "
                              "documents use as a model")
        if name is not None and (not isinstance(name, str) or any(name == n for n, _ in out)):
            raise RecipeError(f"{where}: name {name!r} must be a string, unique in the file")
        out.append((name, recipe_from_dict(doc, where)))
    return out


def stages_to_yaml(stages: list[tuple[str | None, AnyRecipe]], header: str = "") -> str:
    parts = []
    for name, recipe in stages:
        body = recipe.to_yaml()
        parts.append((f"name: {name}\n" if name else "") + body)
    return header + "---\n".join(parts)




def rename_models(data: Any, names: dict[str, str]) -> Any:
    """``data`` with every string equal to a key of ``names`` replaced (stage name -> folder)."""
    if isinstance(data, dict):
        return {k: rename_models(v, names) for k, v in data.items()}
    if isinstance(data, list):
        return [rename_models(v, names) for v in data]
    if isinstance(data, str) and data in names:
        return names[data]
    return data
