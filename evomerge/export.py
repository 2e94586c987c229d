"""Taking recipes out of a run folder: ranking, evomerge and mergekit YAML."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from evomerge.dataflow.recipe import PathRecipe
from evomerge.merge.methods import get_method, uses_random_masks
from evomerge.recipe import Recipe

EVOMERGE_ONLY_KEYS = ("mask_seed",)


def mergekit_yaml(recipe: Recipe | PathRecipe, note: str | None = None) -> str:
    """The recipe as mergekit-yaml reads it, models named as the user gave them.

    A layer-order recipe is exported folded: a ``passthrough`` over one-layer slices with its step
    scales on the output projections (evomerge/dataflow/fold.py).

    For DARE/DELLA methods mergekit draws its own masks from torch's global generator, so it
    rebuilds the evaluated model only in distribution; ``evomerge merge`` on the evomerge recipe
    (which keeps ``mask_seed``) rebuilds it exactly. The header says so.
    """
    if isinstance(recipe, PathRecipe):
        from evomerge.dataflow.fold import passthrough_recipe

        recipe = passthrough_recipe(recipe)
        note = (f"{note}; " if note else "") + "a layer path folded into passthrough slices"
    data = yaml.safe_load(recipe.to_yaml())
    for key in EVOMERGE_ONLY_KEYS:
        data.pop(key, None)
    lines = ["# mergekit recipe exported by evomerge (mergekit-yaml THIS_FILE OUT_DIR)"]
    if note:
        lines.append(f"# {note}")
    if uses_random_masks(get_method(recipe.merge_method)):
        lines += [f"# {recipe.merge_method} draws random masks: mergekit reproduces the evaluated model only in",
                  "# distribution. `evomerge merge` on the evomerge recipe (with its mask_seed) rebuilds it exactly."]
    return "\n".join(lines) + "\n" + yaml.safe_dump(data, sort_keys=False)


def ranked_candidates(records: list[dict]) -> list[dict]:
    """Distinct successful recipes, best first: those re-scored on the full dev split (by that
    score; the winner first), then the others by their search (subset) fitness."""
    rescored = {r["recipe_hash"]: r for r in records if r["type"] == "rescore" and r["status"] == "ok"}
    best_by_hash: dict[str, dict] = {}
    for r in records:
        if r["type"] == "candidate" and r["status"] == "ok":
            h = r["recipe_hash"]
            if h not in best_by_hash or r["fitness"] > best_by_hash[h]["fitness"]:
                best_by_hash[h] = r
    top = sorted(rescored.values(), key=lambda r: (-r["fitness"], r["generation"], r["index"]))
    # The winner is the best of the *final* top-k; background work may have re-scored recipes that
    # left the top-k later (docs/ray.md), which rank after it.
    final = next((r for r in reversed(records) if r["type"] == "final"), None)
    if final is not None:
        top.sort(key=lambda r: r["recipe_hash"] != final["recipe_hash"])
    rest = sorted((r for h, r in best_by_hash.items() if h not in rescored),
                  key=lambda r: (-r["fitness"], r["generation"], r["index"]))
    return top + rest


def recipe_from_run(run_dir: str | Path, rank: int = 1) -> tuple[Recipe, dict]:
    """The rank-th best recipe of a run (1 = the winner) and the log record that scored it."""
    from evomerge.codec import make_codec
    from evomerge.config import SearchConfig
    from evomerge.run import RunFolder, RunFolderError

    run = RunFolder.open(run_dir)
    ranked = ranked_candidates(run.records())
    if not ranked:
        raise RunFolderError(f"run {str(run_dir)!r} has no successful evaluations yet: nothing to export")
    if not 1 <= rank <= len(ranked):
        raise ValueError(f"--rank must be between 1 and {len(ranked)} (the run's distinct recipes), got {rank}")
    cfg = SearchConfig.from_dict(run.config_dict(), source=str(Path(run_dir) / "config.yaml"))
    record = ranked[rank - 1]
    recipe = make_codec(cfg).to_recipe(np.array(record["genome"]))
    if recipe.hash() != record["recipe_hash"]:
        raise RunFolderError(f"the genome of generation {record['generation']}, candidate {record['index']} no "
                             "longer decodes to its logged recipe (the code or the source models changed)")
    return recipe, record


def describe(record: dict) -> str:
    kind = "full-dev fitness" if record["type"] == "rescore" else "search fitness"
    return f"generation {record['generation']}, candidate {record['index']}, {kind} {record['fitness']:.4f}"
