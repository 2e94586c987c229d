"""LoRA adapters as merge sources: equal to peft's merge_and_unload + the same method on full
models, and every bad adapter refused early with a clear message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from lora_helpers import edit_config, make_adapter, merged_full
from merge_helpers import model_family

from evomerge.merge.engine import merge_state_dict
from evomerge.models.sources import MergeError, load_source
from evomerge.recipes.parameter_space import Recipe

# float32 on one machine: the adapter path computes W + (B @ A) * scaling as peft does.
ATOL = 1e-6


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    base, other = model_family(root, "llama", n=1)
    out = {"base": base, "other": other}
    out["a1"] = make_adapter(base, root / "a1", seed=1)
    out["a2"] = make_adapter(base, root / "a2", seed=2, rank=2, targets=("q_proj", "up_proj"),
                             use_rslora=True)
    out["a3"] = make_adapter(base, root / "a3", seed=3, rank=3)
    for k in ("a1", "a2", "a3"):
        out[f"full_{k}"] = merged_full(base, out[k], root / f"full_{k}")
    return out


def _recipe(method: str, base: Path | None, models: list[str], **params) -> Recipe:
    # linear has no base: an adapter folder then finds it through peft's base_model_name_or_path
    base = None if method == "linear" else str(base)
    return Recipe.from_dict({"merge_method": method, "base_model": base, "dtype": "float32",
                             "models": [{"model": m, "parameters": dict(params)} for m in models]})


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"weight": 0.6}), ("ties", {"weight": 0.8, "density": 0.5}),
    ("dare_linear", {"weight": 0.7, "density": 0.6}), ("linear", {"weight": 0.5})])
def test_adapter_sources_equal_merge_and_unload(family, method, params):
    adapters = [str(family[k]) for k in ("a1", "a2", "a3")]
    fulls = [str(family[f"full_{k}"]) for k in ("a1", "a2", "a3")]
    got = merge_state_dict(_recipe(method, family["base"], adapters, **params))
    want = merge_state_dict(_recipe(method, family["base"], fulls, **params))
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=ATOL, rtol=0)


def test_mergekit_plus_syntax_reads_as_base_plus_adapter(family):
    ref = f"{family['base']}+{family['a1']}"
    src = load_source(ref)
    assert src.adapter.ranks and src.base_source.path == family["base"]
    got = merge_state_dict(_recipe("task_arithmetic", family["base"], [ref], weight=1.0))
    want = merge_state_dict(_recipe("task_arithmetic", family["base"],
                                    [str(family["full_a1"])], weight=1.0))
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=ATOL, rtol=0)
    # the adapter's weights are hashed in the model card with the base's
    assert src.weight_files[-1].name == "adapter_model.safetensors"


def test_adapter_without_a_base_names_the_two_ways(family, tmp_path):
    a = shutil.copytree(family["a1"], tmp_path / "a")
    edit_config(a, base_model_name_or_path="no/such/model")
    with pytest.raises(MergeError, match=r"needs its base model: write it as BASE\+"):
        load_source(str(a))


def _copy(family, tmp_path, name="a") -> Path:
    return shutil.copytree(family["a1"], tmp_path / name)


def test_dora_adapter_refused(family, tmp_path):
    a = _copy(family, tmp_path)
    edit_config(a, use_dora=True)
    with pytest.raises(MergeError, match="DoRA adapter"):
        load_source(f"{family['base']}+{a}")


def test_pickled_adapter_refused(family, tmp_path):
    from safetensors.torch import load_file

    a = _copy(family, tmp_path)
    torch.save(load_file(a / "adapter_model.safetensors"), a / "adapter_model.bin")
    (a / "adapter_model.safetensors").unlink()
    with pytest.raises(MergeError, match=r"pickled \(adapter_model.bin\).*--allow-pickle"):
        load_source(f"{family['base']}+{a}")
    with pytest.raises(MergeError, match="not read even with allow_pickle"):
        load_source(f"{family['base']}+{a}", allow_pickle=True)


def test_adapter_of_another_shape_refused(family, tmp_path):
    from safetensors.torch import load_file, save_file

    a = _copy(family, tmp_path)
    state = load_file(a / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("q_proj.lora_A.weight"))
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] * 2)
    save_file(state, a / "adapter_model.safetensors")
    with pytest.raises(MergeError, match=r"does not fit the base's .*q_proj.weight .*another base"):
        load_source(f"{family['base']}+{a}")


def test_adapter_of_another_base_with_same_shapes_refused_by_fingerprint(family, tmp_path):
    from safetensors.torch import load_file, save_file

    from evomerge.models.adapters import FINGERPRINT_KEY, base_fingerprint, read_adapter

    a = _copy(family, tmp_path)
    base = load_source(str(family["base"]))
    info = read_adapter(a, base)
    state = load_file(a / "adapter_model.safetensors")
    save_file(state, a / "adapter_model.safetensors",
              metadata={"format": "pt", FINGERPRINT_KEY: base_fingerprint(base, list(info.modules))})
    load_source(f"{family['base']}+{a}")  # its own base: fine
    with pytest.raises(MergeError, match="trained on another base"):
        load_source(f"{family['other']}+{a}")


def test_target_modules_the_base_lacks_refused(family, tmp_path):
    from safetensors.torch import load_file, save_file

    a = _copy(family, tmp_path)
    state = load_file(a / "adapter_model.safetensors")
    state = {k.replace("q_proj", "qkv_proj"): v for k, v in state.items()}
    save_file(state, a / "adapter_model.safetensors")
    with pytest.raises(MergeError, match=r"targets modules that the base .* lacks: .*qkv_proj"):
        load_source(f"{family['base']}+{a}")
    b = _copy(family, tmp_path, "b")
    edit_config(b, target_modules=["q_proj", "wq"])
    with pytest.raises(MergeError, match=r"target_modules \['wq'\] do not exist"):
        load_source(f"{family['base']}+{b}")


def test_bad_adapters_fail_before_any_tensor_is_read(family, tmp_path, monkeypatch):
    from evomerge.models import sources

    a = _copy(family, tmp_path)
    edit_config(a, use_dora=True)

    def boom(*args, **kwargs):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(sources.SourceModel, "read", boom)
    with pytest.raises(MergeError, match="DoRA"):
        merge_state_dict(_recipe("task_arithmetic", family["base"], [str(a)], weight=1.0))


def test_adapter_config_read_with_peft(family):
    src = load_source(f"{family['base']}+{family['a2']}")
    cfg = src.adapter.config
    assert type(cfg).__name__ == "LoraConfig" and cfg.use_rslora and cfg.r == 2
    assert set(src.adapter.scalings.values()) == {8 / 2 ** 0.5}
    assert json.loads((family["a2"] / "adapter_config.json").read_text())["r"] == 2


# --- export as an adapter ----------------------------------------------------------------------


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"weight": 0.6, "lambda": 1.3}), ("linear", {"weight": 0.5})])
def test_exported_adapter_loads_in_peft_and_equals_the_full_merge(family, tmp_path, method,
                                                                  params):
    from evomerge.runs.adapter import write_adapter

    adapters = [str(family[k]) for k in ("a1", "a2", "a3")]
    data = {"merge_method": method, "dtype": "float32",
            "models": [{"model": m, "parameters": {"weight": params["weight"]}} for m in adapters]}
    if method == "task_arithmetic":
        data.update(base_model=str(family["base"]), parameters={"lambda": params["lambda"]})
        # a per-layer gradient, as a layer-wise search writes it
        data["models"][0]["parameters"]["weight"] = [0.2, 0.9]
    recipe = Recipe.from_dict(data)
    out = write_adapter(recipe, tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 + 2 + 3 and cfg["lora_alpha"] == cfg["r"]
    assert cfg["rank_pattern"]  # modules that only some adapters target have a smaller rank
    got = _peft_merged(family["base"], out)
    want = merge_state_dict(recipe)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0)


def test_adapter_export_refuses_inexact_methods(family, tmp_path):
    from evomerge.core.errors import UsageError
    from evomerge.runs.adapter import write_adapter

    ties = _recipe("ties", family["base"], [str(family["a1"]), str(family["a2"])], weight=1.0,
                   density=0.5)
    with pytest.raises(UsageError, match="a ties merge of LoRA adapters is not a LoRA"):
        write_adapter(ties, tmp_path / "x")
    mixed = _recipe("task_arithmetic", family["base"], [str(family["a1"]),
                                                        str(family["full_a2"])], weight=1.0)
    with pytest.raises(UsageError, match="is a full model, not an adapter"):
        write_adapter(mixed, tmp_path / "x")
    unnormalized = Recipe.from_dict({
        "merge_method": "linear", "parameters": {"normalize": False},
        "models": [{"model": str(family[k]), "parameters": {"weight": 0.7}} for k in ("a1", "a2")]})
    with pytest.raises(UsageError, match="without normalize"):
        write_adapter(unnormalized, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_search_config_with_a_bad_adapter_names_the_field(family, tmp_path):
    from evomerge.core.errors import ConfigError
    from evomerge.search.config import SearchConfig
    from evomerge.search.validation import check_sources

    a = _copy(family, tmp_path)
    edit_config(a, use_dora=True)
    cfg = SearchConfig.from_dict({
        "models": [str(family["a1"]), str(a)], "base_model": str(family["base"]),
        "search_space": "ps_task_arithmetic", "tasks": [{"name": "zoo_add", "metric": "acc"}],
        "budget": {"generations": 1}})
    with pytest.raises(ConfigError, match=r"models\.1: .*DoRA adapter"):
        check_sources(cfg)
    ok = SearchConfig.from_dict({**cfg.model_dump(exclude_none=True),
                                 "models": [str(family["a1"]), str(family["a3"])]})
    assert check_sources(ok) == 2
