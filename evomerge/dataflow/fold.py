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

import json
import os
from pathlib import Path

from evomerge.dataflow.model import check_path
from evomerge.dataflow.recipe import PathRecipe
from evomerge.recipe import Recipe

# Beyond this the norms' epsilon (and fp16/bf16 range) separate the folded model from the path.
MAX_SCALE_PRODUCT = 1e4


class FoldError(ValueError):
    """A path that cannot be folded into a plain model or a passthrough recipe."""


def _same(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def read_configs(recipe: PathRecipe) -> dict[str, dict]:
    """config.json of every model the recipe reads (no weights)."""
    out = {}
    for name in recipe.referenced_models():
        path = Path(name) / "config.json"
        if not path.is_file():
            raise FoldError(f"{name}: no config.json (model folder missing?)")
        out[name] = json.loads(path.read_text(encoding="utf-8"))
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


def write_path_model(recipe: PathRecipe, out_dir: str | os.PathLike, **kwargs) -> Path:
    """The folded path as a Hugging Face folder (``evomerge merge`` on a layer-order recipe)."""
    from evomerge.merge.engine import write_merged_model

    return write_merged_model(passthrough_recipe(recipe), out_dir, **kwargs)
