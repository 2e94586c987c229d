"""configs/zoo_slerp.yaml: a search over slerp's t per layer group that runs, resumes exactly
after a kill and exports a mergekit recipe of the winner (at a tiny budget)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.merge.engine import merge_state_dict
from evomerge.recipes.parameter_space import Recipe
from evomerge.runs.folder import LOG, OPTIMIZER, RunFolder, history
from evomerge.runs.start import run_search
from evomerge.search.config import SearchConfig

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "zoo_slerp.yaml"


def slerp_config(zoo_dir: Path, run_dir: Path) -> SearchConfig:
    """The shipped config over the test zoo, at a tiny budget (2 generations of 2, 6 items)."""
    text = CONFIG.read_text().replace("artifacts/zoo", str(zoo_dir))
    data = yaml.safe_load(text)
    data.update(tasks=[{**t, "limit": 6} for t in data["tasks"]], batch_size=32, threads=1,
                optimizer={"name": "cma", "popsize": 2}, budget={"generations": 2},
                rescore_top_k=1, run_dir=str(run_dir))
    return SearchConfig.from_dict(data)


def test_the_slerp_search_resumes_exactly_and_exports_a_mergekit_recipe(zoo_dir, tmp_path):
    ref = tmp_path / "ref"
    run_search(slerp_config(zoo_dir, ref), quiet=True)
    ref_records = RunFolder.open(ref).records()
    # t per layer group: embeddings, 2 layer groups, head (the zoo has 4 layers)
    best = Recipe.from_dict(yaml.safe_load((ref / "best.yaml").read_text()))
    assert best.merge_method == "slerp" and len(best.slices) == 2
    assert {"t"} == set(best.slices[0].parameters) == set(best.slices[1].parameters)

    # killed after the first generation: the log cut there, the optimizer checkpoint stale
    killed = tmp_path / "killed"
    shutil.copytree(ref, killed)
    (killed / "lock").unlink(missing_ok=True)
    lines = (killed / LOG).read_text().splitlines(keepends=True)
    first_gen = min(i for i, line in enumerate(lines) if json.loads(line)["type"] == "generation")
    (killed / LOG).write_text("".join(lines[:first_gen + 1]))
    (killed / OPTIMIZER).write_text(json.dumps({"stale": True}) + "\n")
    for name in ("best.yaml", "best.mergekit.yaml"):
        (killed / name).unlink(missing_ok=True)
    run_search(None, run_dir=killed, resume=True, quiet=True)
    assert history(RunFolder.open(killed).records()) == history(ref_records)
    assert (killed / "best.yaml").read_text() == (ref / "best.yaml").read_text()

    # the mergekit export names slerp's t and builds the winner's tensors
    exported = yaml.safe_load((ref / "best.mergekit.yaml").read_text())
    assert exported["merge_method"] == "slerp" and "mask_seed" not in exported
    a, b = merge_state_dict(Recipe.from_dict(exported)), merge_state_dict(best)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
