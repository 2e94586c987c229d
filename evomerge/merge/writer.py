"""Building any recipe file: a merge recipe, a layer-order recipe, or several stages of them.

A file of several YAML documents is a staged recipe, as ``mergekit-multi`` reads it: every
document but the last has a ``name``; later documents use that name as a model. The named stages
are built into a temporary folder next to the output and removed once the last one is written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from evomerge.merge.engine import write_merged_model
from evomerge.models.sources import MergeError
from evomerge.recipes.fold import passthrough_recipe
from evomerge.recipes.layer_path import AnyRecipe, PathRecipe, recipe_from_dict, rename_models


def write_model(recipe: AnyRecipe, out_dir: str | os.PathLike, **kwargs) -> Path:
    """One recipe as a Hugging Face folder; a layer path is written folded (recipes/fold.py)."""
    if isinstance(recipe, PathRecipe):
        return write_path_model(recipe, out_dir, **kwargs)
    return write_merged_model(recipe, out_dir, **kwargs)


def write_stages(stages: list[tuple[str | None, AnyRecipe]], out_dir: str | os.PathLike, *,
                 force: bool = False, **kwargs) -> Path:
    """The last stage into ``out_dir``; earlier (named) stages into a temporary folder."""
    out = Path(out_dir)
    if out.exists() and not force:
        raise MergeError(f"{out} exists; pass --force (force=True) to replace it")
    if len(stages) == 1:
        return write_model(stages[0][1], out, force=force, **kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.stages-", dir=out.parent))
    try:
        folders: dict[str, str] = {}
        for i, (name, recipe) in enumerate(stages):
            if folders:
                data = rename_models(recipe.model_dump(mode="json", exclude_none=True), folders)
                recipe = recipe_from_dict(data, f"stage {name or i + 1}")
            if i == len(stages) - 1:
                return write_model(recipe, out, force=force, **kwargs)
            folder = tmp / str(name)
            write_model(recipe, folder, **kwargs)
            folders[str(name)] = str(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    raise AssertionError("unreachable")


def write_path_model(recipe: PathRecipe, out_dir: str | os.PathLike, **kwargs) -> Path:
    """The folded path as a Hugging Face folder (``evomerge merge`` on a layer-order recipe)."""
    return write_merged_model(passthrough_recipe(recipe), out_dir, **kwargs)
