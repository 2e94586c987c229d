"""Folding a path's step scales into weights: a plain model with len(path) layers.

A pre-norm block reads the residual stream only through norms, and n(c*x) = n(x) for c > 0 (up
to the norm's epsilon). Running step j on its input times w_j is therefore the same block on the
unscaled stream with its two output projections (attention and MLP, weights and biases) times
1 / prod_{k <= j} w_k, and a stream that carries that factor from there on: later norms, the final
one included, do not see it (derivation: docs/dataflow.md).

The folded model is written as mergekit's ``passthrough`` over one-layer slices, with ``scale``
on the output projections; mergekit and ``evomerge merge`` build the same HF folder from it. As in
mergekit's passthrough, the embeddings come from the first slice's model and the head from the
last's, so a recipe whose ``embeddings`` / ``head`` name other models cannot be exported this way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from evomerge.core.errors import FoldError, ModelFolderError
from evomerge.models.architectures import (
    ArchitectureError,
    ArchSpec,
    arch_spec,
    num_layers,
    per_layer_keys,
)
from evomerge.models.folders import read_model_config
from evomerge.recipes.layer_path import PathRecipe
from evomerge.recipes.parameter_space import Recipe

# Beyond this the norms' epsilon (and fp16/bf16 range) separate the folded model from the path.
MAX_SCALE_PRODUCT = 1e4


def _same(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def check_path(recipe: PathRecipe, configs: Mapping[str, dict]) -> ArchSpec:
    """Checks a path against its sources' config.json (no weights): architecture on the
    allow-list, one model type and hidden size, layer indices in range, tied heads consistent."""
    def config_of(name: str) -> dict:
        return next(c for k, c in configs.items() if _same(k, name))

    ref_name = recipe.embeddings
    ref = config_of(ref_name)
    spec = arch_spec(ref, ref_name)
    for name in recipe.referenced_models():
        c = config_of(name)
        arch_spec(c, name)
        for key in ("model_type", "hidden_size", "n_embd", "vocab_size"):
            if c.get(key) != ref.get(key):
                raise ArchitectureError(f"{name} has {key}={c.get(key)!r} but {ref_name} has "
                                        f"{ref.get(key)!r}; a path joins models of one architecture "
                                        "and width")
    for i, step in enumerate(recipe.path):
        n = num_layers(config_of(step.model))
        if step.layer >= n:
            raise ArchitectureError(f"path.{i}: layer {step.layer} of {step.model} does not exist "
                                    f"(it has {n} layers)")
    if ref.get("tie_word_embeddings") and not _same(recipe.head, recipe.embeddings):
        raise ArchitectureError(f"head: {ref_name} ties lm_head to its embeddings, so the head must "
                                f"come from the embeddings' model, not {recipe.head}")
    return spec


def path_config_updates(recipe: PathRecipe, configs: Mapping[str, dict]) -> dict:
    """The config keys that change for the path: the layer count and the per-layer lists."""
    def config_of(name: str) -> dict:
        return next(c for k, c in configs.items() if _same(k, name))

    ref = config_of(recipe.embeddings)
    updates: dict = {"num_hidden_layers": len(recipe.path)}
    for key in per_layer_keys(ref):
        values = []
        for i, step in enumerate(recipe.path):
            src = config_of(step.model).get(key)
            if not isinstance(src, list):
                raise ArchitectureError(f"path.{i}: {step.model} has no per-layer {key!r} list")
            values.append(src[step.layer])
        updates[key] = values
    return updates


def read_configs(recipe: PathRecipe) -> dict[str, dict]:
    """config.json of every model the recipe reads (no weights)."""
    out = {}
    for name in recipe.referenced_models():
        try:
            out[name] = read_model_config(name)
        except ModelFolderError as e:
            raise FoldError(str(e)) from None
    return out


def check_scale_products(recipe: PathRecipe, bound: float = MAX_SCALE_PRODUCT) -> None:
    for i, p in enumerate(recipe.scale_products()):
        if not 1 / bound <= p <= bound:
            raise FoldError(f"path.{i}: the product of the scales up to this step is {p:.3g}, "
                            f"outside [1/{bound:g}, {bound:g}]; the norms' epsilon would make the "
                            "folded model differ from the path")


def passthrough_recipe(recipe: PathRecipe, *, max_scale_product: float = MAX_SCALE_PRODUCT) -> Recipe:
    """The folded path as a mergekit ``passthrough`` recipe (one slice per step)."""
    spec = check_path(recipe, read_configs(recipe))
    first, last = recipe.path[0].model, recipe.path[-1].model
    if not _same(recipe.embeddings, first) or not _same(recipe.head, last):
        raise FoldError("a passthrough merge takes the embeddings from the first step's model and the "
                        f"head from the last step's ({first}, {last}); this path names embeddings "
                        f"{recipe.embeddings} and head {recipe.head}")
    check_scale_products(recipe, max_scale_product)
    slices = []
    for step, product in zip(recipe.path, recipe.scale_products(), strict=True):
        source: dict = {"model": step.model, "layer_range": [step.layer, step.layer + 1]}
        if product != 1.0:
            source["parameters"] = {"scale": [{"filter": f, "value": 1.0 / product}
                                              for f in spec.out_projections]}
        slices.append({"sources": [source]})
    data: dict = {"merge_method": "passthrough", "slices": slices}
    if recipe.dtype:
        data["dtype"] = recipe.dtype
    if recipe.tokenizer_source and not _same(recipe.tokenizer_source, first):
        data["tokenizer_source"] = recipe.tokenizer_source
    return Recipe.from_dict(data, "<folded path>")
