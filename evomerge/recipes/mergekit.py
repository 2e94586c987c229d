"""Recipes as mergekit-yaml reads them (export)."""

from __future__ import annotations

import yaml

from evomerge.methods.registry import EVOMERGE_ONLY, get_method, uses_random_masks
from evomerge.recipes.layer_path import PathRecipe
from evomerge.recipes.parameter_space import Recipe

EVOMERGE_ONLY_KEYS = ("mask_seed",)


def mergekit_yaml(recipe: Recipe | PathRecipe, note: str | None = None) -> str:
    """The recipe as mergekit-yaml reads it, models named as the user gave them.

    A layer-order recipe is exported folded: a ``passthrough`` over one-layer slices with its step
    scales on the output projections (evomerge/recipes/fold.py).

    Every method's parameters carry mergekit 0.1.5's names (slerp's t, nuslerp_flatten, ...).
    For DARE/DELLA methods mergekit draws its own masks from torch's global generator, so it
    rebuilds the evaluated model only in distribution; ``evomerge merge`` on the evomerge recipe
    (which keeps ``mask_seed``) rebuilds it exactly. The header says so.
    """
    if isinstance(recipe, PathRecipe):
        from evomerge.recipes.fold import passthrough_recipe

        recipe = passthrough_recipe(recipe)
        note = (f"{note}; " if note else "") + "a layer path folded into passthrough slices"
    data = _adapter_references(yaml.safe_load(recipe.to_yaml()), recipe.base_model)
    for key in EVOMERGE_ONLY_KEYS:
        data.pop(key, None)
    lines = ["# mergekit recipe exported by evomerge (mergekit-yaml THIS_FILE OUT_DIR)"]
    if note:
        lines.append(f"# {note}")
    if uses_random_masks(get_method(recipe.merge_method)):
        lines += [f"# {recipe.merge_method} draws random masks: mergekit reproduces the evaluated model only in",
                  "# distribution. `evomerge merge` on the evomerge recipe (with its mask_seed) rebuilds it exactly."]
    if recipe.merge_method in (*EVOMERGE_ONLY, "lorahub"):
        lines += [f"# {recipe.merge_method} is evomerge's own method: mergekit 0.1.5 cannot run this recipe;",
                  "# build it with `evomerge merge` on the evomerge recipe."]
    if recipe.merge_method == "arcee_fusion":
        lines += ["# arcee_fusion: mergekit samples the quantiles of tensors above 1,000,000 elements at",
                  "# random; evomerge sorts them all. Below that size both give the same model."]
    return "\n".join(lines) + "\n" + yaml.safe_dump(data, sort_keys=False)


def _adapter_references(data: dict, base: str | None) -> dict:
    """LoRA adapter folders named as mergekit names them: ``base+adapter`` (models/adapters.py).
    An adapter's base is the recipe's base_model, else the base its config records."""
    from evomerge.models.adapters import is_adapter_folder, recorded_base

    def ref(name):
        if isinstance(name, str) and "+" not in name and is_adapter_folder(name):
            b = base if base and not is_adapter_folder(base) else recorded_base(name)
            return f"{b}+{name}" if b else name
        return name

    for m in data.get("models") or []:
        m["model"] = ref(m.get("model"))
    for s in data.get("slices") or []:
        for src in s.get("sources") or []:
            src["model"] = ref(src.get("model"))
    if data.get("tokenizer_source") not in (None, "base"):
        data["tokenizer_source"] = ref(data["tokenizer_source"])
    return data
