"""trust_remote_code: a config's value reaches every loader that takes it, it is False unless asked
for, and sources whose own code evomerge's merges cannot run are refused before anything loads."""

from __future__ import annotations

import json
import shutil

import pytest
import transformers
from ray_helpers import tiny_config

from evomerge.core.errors import ConfigError
from evomerge.evaluation.evaluator import evaluate_model_dir
from evomerge.runs.start import run_search
from evomerge.search.config import SearchConfig
from evomerge.search.validation import check_sources


@pytest.fixture
def loads(monkeypatch):
    """(kind, path, trust_remote_code) of every transformers load (tokenizers, models, configs)."""
    calls = []
    for kind, cls in (("tokenizer", transformers.AutoTokenizer), ("model", transformers.AutoModelForCausalLM),
                      ("config", transformers.AutoConfig)):
        def record(path, *args, _kind=kind, _orig=cls.from_pretrained, **kw):
            calls.append((_kind, str(path), kw.get("trust_remote_code", False)))
            return _orig(path, *args, **kw)

        monkeypatch.setattr(cls, "from_pretrained", record)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("trust", [True, False])
def test_a_search_config_reaches_the_loaders(zoo_dir, tmp_path, loads, trust):
    cfg = tiny_config(zoo_dir, tasks=[{"name": "zoo_rev", "limit": 4}], budget={"generations": 1},
                      optimizer={"name": "cma", "popsize": 2}, background=False, trust_remote_code=trust)
    run_search(SearchConfig.from_dict(cfg), run_dir=tmp_path / "run", quiet=True)
    # the tokenizer that scores every candidate, loaded by the search (in process; workers alike)
    assert ("tokenizer", str(zoo_dir / "base"), trust) in loads
    if not trust:
        assert not [c for c in loads if c[2]], loads  # nothing passes True unless the config says so


def test_evomerge_eval_passes_the_flag_to_every_loader(zoo_dir, loads):
    evaluate_model_dir(zoo_dir / "base", ["zoo_rev"], split="dev", limit=2, trust_remote_code=True)
    assert {(k, t) for k, _, t in loads} >= {("tokenizer", True), ("model", True)}
    assert all(t for _, _, t in loads), loads
    loads.clear()
    evaluate_model_dir(zoo_dir / "base", ["zoo_rev"], split="dev", limit=2)
    assert loads and not any(t for _, _, t in loads), loads


def _with_auto_map(src, dest, file: str):
    shutil.copytree(src, dest)
    data = json.loads((dest / file).read_text())
    data["auto_map"] = {"AutoModelForCausalLM" if file == "config.json" else "AutoTokenizer": "custom.Custom"}
    (dest / file).write_text(json.dumps(data))
    return str(dest)


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_custom_code_sources_are_refused(zoo_dir, tmp_path, file, monkeypatch):
    import evomerge.models.folders as folders

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the sources were checked")

    monkeypatch.setattr(folders, "load_causal_lm", boom)
    custom = _with_auto_map(zoo_dir / "spec_add", tmp_path / "custom", file)
    models = [custom, str(zoo_dir / "spec_rev"), str(zoo_dir / "spec_sub")]
    without = SearchConfig.from_dict(tiny_config(zoo_dir, models=models))
    with pytest.raises(ConfigError, match=rf"models.0: .*auto_map in {file}\); set trust_remote_code: true"):
        check_sources(without)
    # with trust_remote_code the merge engine still cannot run that code: refused, saying why
    trusted = SearchConfig.from_dict(tiny_config(zoo_dir, models=models, trust_remote_code=True))
    with pytest.raises(ConfigError, match=r"models.0: .*cannot run even with trust_remote_code: true"):
        check_sources(trusted)
