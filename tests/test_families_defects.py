"""Issue #30's defects, one test each, on the tiny families of tests/families.py (no vLLM engine
is started here: the vLLM swap is checked through the weights it is handed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from families import cached_families, peft_adapter

from evomerge.core.errors import ConfigError
from evomerge.merge.engine import merge_state_dict
from evomerge.models.sources import load_source
from evomerge.recipes.parameter_space import Recipe


@pytest.fixture(scope="session")
def fam() -> dict[str, dict[str, Path]]:
    return cached_families()


def _ta(fam, family: str) -> Recipe:
    f = fam[family]
    return Recipe.from_dict({
        "merge_method": "task_arithmetic", "base_model": str(f["base"]), "dtype": "float32",
        "models": [{"model": str(f[m]), "parameters": {"weight": w}}
                   for m, w in (("ft1", 0.7), ("ft2", 0.4), ("ft3", -0.2))]})


def _checkpoint_names(folder: Path) -> set[str]:
    from evomerge.models.sources import load_source

    return set(load_source(str(folder)).files)


# --- 1: checkpoint names vs in-memory names (in-place merger) -----------------------------------
@pytest.mark.parametrize("family", ["gpt_neox", "mixtral", "qwen2_moe", "gemma2", "llama"])
def test_inplace_merger_writes_checkpoint_names_into_the_model(fam, family):
    """The in-place merger's model holds the engine's merge under transformers' in-memory names
    (gpt_neox: embed_out -> lm_head; mixtral: per-expert w1/w3/w2 -> fused experts)."""
    from transformers import AutoModelForCausalLM

    from evomerge.merge.inplace.merger import InPlaceMerger

    recipe = _ta(fam, family)
    f = fam[family]
    merger = InPlaceMerger([str(f[m]) for m in ("ft1", "ft2", "ft3")], str(f["base"]),
                           "task_arithmetic")
    built = merger.build(recipe)
    expected = merge_state_dict(recipe)
    # the engine's tensors loaded the way transformers loads a folder: into a model
    ref = AutoModelForCausalLM.from_pretrained(str(f["base"]), dtype=torch.float32)
    missing, unexpected = _load_checkpoint_state(ref, expected)
    assert not missing and not unexpected
    got, want = built.state_dict(), ref.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _load_checkpoint_state(model, state: dict[str, torch.Tensor]):
    """Loads checkpoint-named tensors into `model` with transformers' own conversion rules."""
    import tempfile

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model.config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in state.items()}, f"{tmp}/model.safetensors",
                  metadata={"format": "pt"})
        loaded, info = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32,
                                                            output_loading_info=True)
    model.load_state_dict(loaded.state_dict())
    return info["missing_keys"], info["unexpected_keys"]


# --- 1, 2: the vLLM swap is handed checkpoint names, tied heads dropped -------------------------
@pytest.mark.parametrize("family", ["gemma2", "mixtral", "gpt_neox", "llama", "llama_untied"])
def test_vllm_swap_hands_over_the_checkpoints_names(fam, family, monkeypatch):
    """vLLM's load_weights takes checkpoint names: mixtral's per-expert tensors, gpt_neox's
    embed_out, and no lm_head where the family ties it (Gemma 2 has no lm_head module then)."""
    from evomerge.evaluation import vllm_engine
    from evomerge.models.folders import load_causal_lm

    handed: dict[str, tuple] = {}

    class FakeEngine:
        def collective_rpc(self, method, kwargs=None):
            if method == "reload_weights":
                handed.update({k: tuple(v.shape) for k, v in kwargs["weights_iterator"]})
            return [[]]  # the after-reload refresh and check (vllm_reload.py): nothing found

        def reset_prefix_cache(self):
            return True  # vLLM's answer when no request runs

    class FakeLM:
        model = FakeEngine()

    ev = vllm_engine.VllmEvaluator.__new__(vllm_engine.VllmEvaluator)
    monkeypatch.setattr(ev, "engine", lambda: FakeLM(), raising=False)
    monkeypatch.setattr(ev, "run", lambda lm, **kw: {}, raising=False)
    model = load_causal_lm(fam[family]["ft1"])
    ev.evaluate(model)
    src = load_source(str(fam[family]["ft1"]))
    assert handed == {k: tuple(v) for k, v in src.shapes.items()}


# --- 4: gpt_neox's head from the last slice ------------------------------------------------------
def test_gpt_neox_head_comes_from_the_last_slice(fam):
    """embed_out is gpt_neox's head: mergekit takes it from the last slice, not with the
    embeddings from the first."""
    f = fam["gpt_neox"]
    layout = load_source(str(f["base"])).layout
    assert "embed_out.weight" in layout.post and "embed_out.weight" not in layout.pre
    recipe = Recipe.from_dict({"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(f["ft1"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(f["ft2"]), "layer_range": [2, 4]}]}]})
    out = merge_state_dict(recipe)
    ft1, ft2 = load_source(str(f["ft1"])), load_source(str(f["ft2"]))
    from contextlib import ExitStack

    with ExitStack() as stack:
        assert torch.equal(out["embed_out.weight"], ft2.read("embed_out.weight", stack))
        assert torch.equal(out["gpt_neox.embed_in.weight"], ft1.read("gpt_neox.embed_in.weight", stack))


# --- 5: peft's all-linear targets, written as full module paths ----------------------------------
@pytest.mark.parametrize("family", ["phi3", "gpt2", "gpt_neox", "falcon", "llama"])
def test_all_linear_adapter_with_full_module_paths_is_read(fam, family, tmp_path):
    """peft writes target_modules="all-linear" as full module paths for some families; the
    adapter reads as peft's merge_and_unload gives it (gpt2's fan_in_fan_out included)."""
    from contextlib import ExitStack

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = fam[family]["base"]
    adapter = peft_adapter(base, tmp_path / "a", "all-linear")
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    src = load_source(f"{base}+{adapter}")
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter)
    ).merge_and_unload().state_dict()
    assert src.adapter.modules, targets
    with ExitStack() as stack:
        for name in src.adapter.modules:
            assert torch.allclose(src.read(name, stack), merged[name], atol=1e-6), name


def test_full_path_target_modules_the_base_lacks_are_refused(fam, tmp_path):
    from evomerge.core.errors import MergeError

    base = fam["llama"]["base"]
    adapter = peft_adapter(base, tmp_path / "a", ["model.layers.0.self_attn.q_proj"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["target_modules"] = ["model.layers.0.self_attn.q_proj", "model.layers.9.self_attn.q_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match=r"model\.layers\.9\.self_attn\.q_proj"):
        load_source(f"{base}+{adapter}")


# --- 6, 9: the vLLM engine's model folder, checked before any work -------------------------------
def test_vllm_engine_refuses_an_adapter_and_head_size_16(fam, tmp_path):
    from evomerge.evaluation.vllm_engine import engine_folder_problem

    base = fam["llama"]["base"]
    assert engine_folder_problem(base) is None
    adapter = peft_adapter(base, tmp_path / "a", ["q_proj"])
    assert "adapter" in engine_folder_problem(adapter)
    small = tmp_path / "heads16"
    shutil.copytree(base, small)
    cfg = json.loads((small / "config.json").read_text())
    cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"] = 4, 2, 16
    (small / "config.json").write_text(json.dumps(cfg))
    assert "head size 16" in engine_folder_problem(small)


def test_vllm_search_engine_starts_from_the_tokenizer_folder(fam, tmp_path, monkeypatch):
    """A search over base+adapter sources starts its engine from the base (tokenizer_folder()),
    and a head size vLLM's CPU build refuses is a ConfigError before the run folder."""
    from evomerge.evaluation import backends, vllm_engine
    from evomerge.search import validation

    base = fam["llama"]["base"]
    adapter = peft_adapter(base, tmp_path / "a", ["q_proj"])
    seen = {}

    def fake_make(cfg, task, **kw):
        seen["model_dir"] = kw["model_dir"]
        raise ConfigError("stop")

    monkeypatch.setattr(backends, "make_evaluator", fake_make)
    cfg = _vllm_search_config(tmp_path, [f"{base}+{adapter}", str(fam["llama"]["ft1"])], base)
    with pytest.raises(ConfigError, match="stop"):
        validation.check_tasks(cfg)
    assert Path(seen["model_dir"]) == Path(base)
    assert vllm_engine  # imported for its module-level checks


def _vllm_search_config(tmp_path, models, base):
    from evomerge.search.config import SearchConfig

    data = {"models": models, "search_space": "ps_task_arithmetic", "base_model": str(base),
            "tasks": [{"name": "zoo_add", "metric": "acc"}], "budget": {"generations": 1},
            "evaluator": {"backend": "vllm"}, "run_dir": str(tmp_path / "run")}
    p = tmp_path / "search.yaml"
    import yaml

    p.write_text(yaml.safe_dump(data))
    return SearchConfig.load(p)


# --- 7: one special-token rule for generated answers in both backends ---------------------------
def test_vllm_answers_drop_special_tokens_as_hf_does():
    from evomerge.evaluation import vllm_engine

    if vllm_engine.vllm_available() is not None:
        pytest.skip("vLLM does not import here")
    kwargs, until, _ = vllm_engine._quiet_vllm_class().modify_gen_kwargs(
        {"until": ["\n"], "max_gen_toks": 8}, eos="</s>")
    assert kwargs["skip_special_tokens"] is True and "\n" in until
    import inspect

    from lm_eval.models.huggingface import HFLM

    assert inspect.signature(HFLM.tok_decode).parameters["skip_special_tokens"].default is True
