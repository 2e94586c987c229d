"""The zoo's LoRA specialists and a search over them, end to end: the run resumes exactly, its
mergekit YAML (with base+adapter references) rebuilds the winner through `evomerge merge`, and
the winner materializes as a full folder and as a PEFT adapter whose merged weights equal it."""

from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

import cli_process
import pytest
import torch
from merge_helpers import load_folder

from evomerge.runs.folder import RunFolder, history
from evomerge.runs.start import run_search
from evomerge.search.config import SearchConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lora_zoo(zoo_dir) -> Path:
    from evomerge.zoo.lora import build_lora_zoo

    with open(zoo_dir.parent / f"{zoo_dir.name}.lora.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        threads = torch.get_num_threads()
        try:
            build_lora_zoo(zoo_dir, log=lambda *_: None)
        finally:
            torch.set_num_threads(threads)
    return zoo_dir


def test_lora_specialists_are_rank_8_adapters_of_the_base_only(lora_zoo):
    from evomerge.models.sources import MergeError, load_source
    from evomerge.zoo.lora import lora_cache_key, lora_paths, read_lora_manifest

    manifest = read_lora_manifest(lora_zoo)
    assert manifest["key"] == lora_cache_key(lora_zoo, __import__(
        "evomerge.zoo.lora", fromlist=["LoraZooParams"]).LoraZooParams())
    for skill, path in lora_paths(lora_zoo).items():
        src = load_source(str(path))  # its base found through base_model_name_or_path
        assert src.base_source.path.resolve() == (lora_zoo / "base").resolve()
        assert set(src.adapter.ranks.values()) == {8}
        assert manifest["adapters"][f"lora_{skill}"]["steps"] > 0
    with pytest.raises(MergeError, match="trained on another base"):
        load_source(f"{lora_zoo / 'spec_add'}+{lora_paths(lora_zoo)['add']}")


def _config(zoo: Path, run_dir: Path, generations: int) -> SearchConfig:
    from evomerge.zoo.lora import lora_paths

    return SearchConfig.from_dict({
        "models": [str(p) for p in lora_paths(zoo).values()],
        "base_model": str(zoo / "base"),
        "search_space": "ps_task_arithmetic",
        "tasks": [{"name": t, "metric": "acc", "weight": 1 / 3, "limit": 24}
                  for t in ("zoo_add", "zoo_rev", "zoo_sub")],
        "batch_size": 32, "threads": 1, "optimizer": {"name": "cma", "popsize": 4},
        "budget": {"generations": generations}, "seed": 3, "rescore_top_k": 1,
        "run_dir": str(run_dir),
    })


@pytest.fixture(scope="module")
def lora_run(lora_zoo, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("lora_run")
    run_search(_config(lora_zoo, tmp / "run", 2), quiet=True)
    return tmp / "run"


def test_search_over_adapters_resumes_exactly(lora_zoo, lora_run, tmp_path):
    part = tmp_path / "part"
    run_search(_config(lora_zoo, part, 1), quiet=True)
    run_search(_config(lora_zoo, part, 2), run_dir=part, resume=True, quiet=True)
    # a stop after generation 0 and a resume with a larger budget: the same candidates, genome
    # bits, recipes and scores as the uninterrupted run (the first leg's final record aside)
    def candidates(run):
        return [r for r in history(RunFolder.open(run).records()) if r["type"] == "candidate"]

    assert candidates(part) == candidates(lora_run) and len(candidates(part)) == 8


def test_winner_exports_rebuilds_and_materializes_as_folder_and_adapter(lora_zoo, lora_run,
                                                                         tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from evomerge.runs.adapter import materialize_adapter
    from evomerge.runs.materialize import materialize

    yml = tmp_path / "best.mergekit.yaml"
    r = cli_process.run("export", lora_run, "--format", "mergekit", "--out", yml)
    assert r.returncode == 0, r.stderr
    text = yml.read_text()
    models = [ln.split("model: ", 1)[1] for ln in text.splitlines() if "model: " in ln]
    adapters = [m for m in models if "/lora/" in m]
    assert len(adapters) >= 3 and all(m.startswith(f"{lora_zoo / 'base'}+") for m in adapters)
    r = cli_process.run("merge", yml, tmp_path / "rebuilt")
    assert r.returncode == 0, r.stderr
    full, info = materialize(lora_run, tmp_path / "full", score_test=False)
    rebuilt, want = load_folder(tmp_path / "rebuilt"), load_folder(full)
    assert all(torch.equal(rebuilt[k], want[k]) for k in want)

    adapter, ainfo = materialize_adapter(lora_run, tmp_path / "adapter")
    assert ainfo["r"] == 24 and ainfo["recipe_hash"] == info["recipe_hash"]
    base = AutoModelForCausalLM.from_pretrained(str(lora_zoo / "base"), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()
    for k, v in want.items():
        torch.testing.assert_close(merged[k], v, atol=1e-5, rtol=0)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 24
    shutil.rmtree(tmp_path / "rebuilt")


def test_an_adapter_source_scores_as_peft_merges_it(lora_zoo):
    # What the floors and the IRT fitness score for an adapter source: its base with the adapter
    # merged in, as peft's merge_and_unload gives it (an independent implementation).
    from peft import PeftModel

    from evomerge.models.folders import load_causal_lm
    from evomerge.models.sources import load_source_lm
    from evomerge.zoo.lora import lora_paths

    adapter = lora_paths(lora_zoo)["add"]
    ours = load_source_lm(str(adapter), base=str(lora_zoo / "base")).state_dict()
    peft = PeftModel.from_pretrained(load_causal_lm(lora_zoo / "base"), str(adapter))
    want = peft.merge_and_unload().state_dict()
    base = load_causal_lm(lora_zoo / "base").state_dict()
    assert set(ours) == set(want)
    changed = [k for k in want if not torch.equal(want[k], base[k])]
    assert changed and all(not torch.equal(ours[k], base[k]) for k in changed)
    for k in want:
        torch.testing.assert_close(ours[k], want[k], rtol=0, atol=1e-6, msg=k)


def test_irt_fitness_over_adapters_scores_the_adapted_models(lora_zoo, tmp_path):
    # The IRT fitness scores every source on the whole split before the first fit: adapters
    # are scored as their base plus the adapter, not refused as folders without a config.json.
    import numpy as np

    from evomerge.evaluation.evaluator import LmEvalEvaluator
    from evomerge.models.folders import load_tokenizer
    from evomerge.models.sources import load_source_lm
    from evomerge.zoo.lora import lora_paths

    adapters = [str(p) for k, p in lora_paths(lora_zoo).items() if k in ("add", "rev")]
    cfg = SearchConfig.from_dict({
        "models": adapters, "base_model": str(lora_zoo / "base"),
        "search_space": "ps_task_arithmetic", "tasks": [{"name": "zoo_add", "metric": "acc"}],
        "batch_size": 64, "threads": 1, "optimizer": {"name": "cma", "popsize": 3},
        "budget": {"generations": 1}, "seed": 0, "rescore_top_k": 1,
        "fitness": {"estimator": "irt", "anchors": 10}, "run_dir": str(tmp_path / "run")})
    run_search(cfg, quiet=True)
    with np.load(tmp_path / "run" / "irt" / "sources.npz") as z:
        rows = z["zoo_add"]  # sources then the base, by items of the dev split
    assert rows.shape[0] == 3
    ev = LmEvalEvaluator(["zoo_add"], split="dev", batch_size=64)
    tok = load_tokenizer(lora_zoo / "base")
    got = ev.evaluate(load_source_lm(adapters[0], base=str(lora_zoo / "base")), tok)["zoo_add"]
    assert rows[0].mean() == pytest.approx(got.metrics["acc"], abs=1e-12)
    assert rows[0].mean() > rows[2].mean() + 0.2  # the add specialist, well above the base


def test_a_search_over_adapters_without_base_model_uses_their_recorded_base(lora_zoo, tmp_path):
    # No base_model: the tokenizer and the floors' "base" (the first source) come through the
    # base each adapter records, not from the adapter folder (which has no tokenizer).
    from evomerge.models.sources import model_folder
    from evomerge.zoo.lora import lora_paths

    adapters = [str(p) for k, p in lora_paths(lora_zoo).items() if k in ("add", "rev")]
    assert Path(model_folder(adapters[0])).resolve() == (lora_zoo / "base").resolve()
    cfg = SearchConfig.from_dict({
        "models": adapters, "search_space": "ps_multislerp",
        "tasks": [{"name": "zoo_add", "metric": "acc", "limit": 8}], "batch_size": 64,
        "threads": 1, "optimizer": {"name": "cma", "popsize": 3}, "budget": {"generations": 1},
        "seed": 0, "rescore_top_k": 1, "floors": {}, "run_dir": str(tmp_path / "run")})
    out = run_search(cfg, quiet=True)
    frozen = SearchConfig.from_dict(RunFolder.open(tmp_path / "run").config_dict())
    assert out.evaluations == 3 and set(frozen.floors.base_scores) == {"zoo_add"}
    assert frozen.floors.base_scores["zoo_add"] > 0.55  # the add specialist (the base: 0.37)
