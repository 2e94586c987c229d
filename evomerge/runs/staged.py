"""Staged searches: a PS search, then a DFS search over the PS winner and another model (PS+DFS).

    # configs/zoo_ps_dfs.yaml
    tasks: [...]                 # every key of a search config is a default for all stages
    seed: 0
    stages:
      - name: ps
        models: [zoo/spec_rev, zoo/spec_sub]
        base_model: zoo/base
        search_space: ps_task_arithmetic
        budget: {generations: 4}
      - name: dfs
        models: [stage:ps, zoo/spec_sub]   # stage:NAME is the winner of an earlier stage
        search_space: dfs
        budget: {generations: 4}

The run folder holds one ordinary run folder per stage, so each stage checkpoints and resumes as
any search does; a stage's winner is written (once, atomically) as a model folder before a later
stage that names it starts. A kill anywhere resumes with ``evomerge search --resume RUN_DIR``:
finished stages are read back, not run again.

    RUN_DIR/config.yaml          the staged config
    RUN_DIR/stages/<name>/       each stage's run folder (docs/search.md)
    RUN_DIR/models/<name>/       a stage's winner, built for the stages that name it
    RUN_DIR/best.yaml            the final model's recipe with the stages it needs (named YAML
                                 documents, `evomerge merge` builds them in order)
    RUN_DIR/best.mergekit.yaml   the same for mergekit-multi
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import yaml

from evomerge.core.errors import ConfigError
from evomerge.core.io import atomic_write_text
from evomerge.recipes.layer_path import PathRecipe, load_recipe, recipe_from_dict, rename_models
from evomerge.runs.folder import BEST, BEST_MK, CONFIG, RunFolder
from evomerge.search.staged import StagedConfig, stage_ref, staged_file, validate_stages  # noqa: F401


def run_staged(cfg: StagedConfig | None, *, run_dir: str | Path | None = None, resume: bool = False,
               quiet: bool = False, config_path: str | None = None, **executor_kw):
    """``evomerge search`` on a staged config; returns the last stage's outcome (its run_dir is
    the staged folder, where best.yaml holds every stage the final model needs)."""
    from evomerge.merge.writer import write_model
    from evomerge.runs.start import run_search
    from evomerge.search.config import default_run_dir

    if resume:
        if run_dir is None:
            raise ConfigError("--resume needs the run folder")
        top = RunFolder.open(run_dir)
        frozen = StagedConfig.from_dict(yaml.safe_load(top.config_text()), str(Path(run_dir) / CONFIG))
        top.acquire()
        if cfg is not None:  # each stage's run_search refuses changes other than the budget
            top.write_text(CONFIG, cfg.to_yaml())
        cfg = cfg or frozen
    else:
        if cfg is None:
            raise ConfigError("a config is needed to start a search")
        validate_stages(cfg)  # before the run folder exists: a bad config leaves nothing behind
        run_dir = Path(run_dir or cfg.data.get("run_dir") or default_run_dir(config_path))
        top = RunFolder.create(run_dir, cfg.to_yaml())
    root = Path(run_dir)
    try:
        outcome = None
        for i, name in enumerate(cfg.names):
            sc = cfg.stage_config(i, root)
            for j, m in enumerate(cfg.stage_dicts[i].get("models") or []):
                ref = stage_ref(m)
                if ref is not None and not Path(sc.models[j]).is_dir():
                    write_model(load_recipe(root / "stages" / ref / BEST), sc.models[j])
            sub = root / "stages" / name
            if sub.is_dir() and not (sub / CONFIG).is_file():
                shutil.rmtree(sub)  # killed while creating it: it holds no results
            outcome = run_search(sc, run_dir=sub, resume=sub.is_dir(), quiet=quiet, **executor_kw)
        _write_best(cfg, root)
        return dataclasses.replace(outcome, run_dir=root, best_recipe=load_recipe(root / BEST))
    finally:
        top.close()


def _write_best(cfg: StagedConfig, root: Path) -> None:
    """The last stage's recipe with every stage it needs, as named documents."""
    from evomerge.recipes.fold import passthrough_recipe
    from evomerge.runs.export import mergekit_yaml

    needed: list[int] = []

    def need(i: int) -> None:
        for m in cfg.stage_dicts[i].get("models") or []:
            ref = stage_ref(m)
            if ref is not None and cfg.names.index(ref) not in needed:
                need(cfg.names.index(ref))
        needed.append(i)

    need(len(cfg.names) - 1)
    folders = {str(root / "models" / n): n for n in cfg.names}
    ours, theirs = [], []
    for i in needed:
        name = cfg.names[i] if i != len(cfg.names) - 1 else None
        recipe = load_recipe(root / "stages" / cfg.names[i] / BEST)
        folded = passthrough_recipe(recipe) if isinstance(recipe, PathRecipe) else recipe
        ours.append((name, _renamed(recipe, folders)))
        theirs.append((name, _renamed(folded, folders)))
    head = "# evomerge staged recipe: `evomerge merge THIS_FILE OUT_DIR` builds the stages in order\n"
    atomic_write_text(root / BEST, head + "---\n".join(
        (f"name: {n}\n" if n else "") + r.to_yaml() for n, r in ours))
    atomic_write_text(root / BEST_MK, "# mergekit-multi THIS_FILE --intermediate-dir DIR --out-path OUT\n"
                      + "---\n".join((f"name: {n}\n" if n else "") + mergekit_yaml(r) for n, r in theirs))


def _renamed(recipe, names: dict[str, str]):
    return recipe_from_dict(rename_models(recipe.model_dump(mode="json", exclude_none=True), names))
