"""The engine on tiny local models of several architectures, and every kind of bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from merge_helpers import load_folder, model_family, save_model, tiny_config

from evomerge.merge.engine import merge_state_dict, write_merged_model
from evomerge.models import sources as sources_mod
from evomerge.models.sources import MergeError
from evomerge.recipes.parameter_space import Recipe


def ta_recipe(base: Path, fts: list[Path], weights=(0.7, 0.4), **extra) -> Recipe:
    data = {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": w}}
                       for p, w in zip(fts, weights, strict=True)], **extra}
    return Recipe.from_dict(data)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> list[Path]:
    return model_family(tmp_path_factory.mktemp("llama"), "llama", n=2)


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("mistral", False),
                                       ("qwen2", False), ("qwen2", True), ("gpt2", True),
                                       ("gpt2", False)])
def test_architectures_merge_and_reload(tmp_path, arch, tied):
    from transformers import AutoModelForCausalLM

    base, ft1, ft2 = model_family(tmp_path, arch, n=2, tied=tied)
    merged = merge_state_dict(ta_recipe(base, [ft1, ft2]))
    b, x1, x2 = load_folder(base), load_folder(ft1), load_folder(ft2)
    assert set(merged) == set(b)
    assert ("lm_head.weight" in merged) == (not tied)
    for k, v in merged.items():
        torch.testing.assert_close(v, b[k] + 0.7 * (x1[k] - b[k]) + 0.4 * (x2[k] - b[k]))
    if arch == "qwen2":
        assert any(k.endswith("q_proj.bias") for k in merged)
    out = write_merged_model(ta_recipe(base, [ft1, ft2]), tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 5, 9, 12]])).logits
    assert logits.shape == (1, 4, 103) and torch.isfinite(logits).all()
    if tied:
        assert model.get_output_embeddings().weight.data_ptr() == (
            model.get_input_embeddings().weight.data_ptr())


def test_sharded_sources_read_lazily(tmp_path, llama):
    base, ft1, ft2 = llama
    sharded = tmp_path / "ft1_sharded"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ft1).save_pretrained(sharded, max_shard_size="20KB")
    shutil.copy(ft1 / "tokenizer.json", sharded / "tokenizer.json")
    shutil.copy(ft1 / "tokenizer_config.json", sharded / "tokenizer_config.json")
    assert (sharded / "model.safetensors.index.json").is_file()
    a = merge_state_dict(ta_recipe(base, [ft1, ft2]))
    b = merge_state_dict(ta_recipe(base, [sharded, ft2]))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pickled_weights_refused_unless_allowed(tmp_path, llama):
    base, ft1, _ = llama
    from transformers import AutoModelForCausalLM

    pickled = tmp_path / "pickled"
    shutil.copytree(ft1, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(AutoModelForCausalLM.from_pretrained(ft1).state_dict(),
               pickled / "pytorch_model.bin")
    assert not list(pickled.glob("*.safetensors"))
    recipe = ta_recipe(base, [pickled], weights=(0.5,))
    with pytest.raises(MergeError, match="pickled weights.*--allow-pickle"):
        merge_state_dict(recipe)
    merged = merge_state_dict(recipe, allow_pickle=True)
    ref = merge_state_dict(ta_recipe(base, [ft1], weights=(0.5,)))
    assert all(torch.equal(merged[k], ref[k]) for k in ref)


def test_final_norm_and_lm_head_take_t0_of_the_last_slice(llama):
    base, ft1, _ = llama
    b, x = load_folder(base), load_folder(ft1)
    recipe = Recipe.from_dict({
        "merge_method": "task_arithmetic", "base_model": str(base),
        "slices": [
            {"sources": [{"model": str(base), "layer_range": [0, 1]},
                         {"model": str(ft1), "layer_range": [0, 1]}],
             "parameters": {"weight": [0.2, 0.6]}},
            {"sources": [{"model": str(base), "layer_range": [1, 2]},
                         {"model": str(ft1), "layer_range": [1, 2]}],
             "parameters": {"weight": [0.4, 0.8]}},
        ]})
    merged = merge_state_dict(recipe)

    def expect(name, w):
        torch.testing.assert_close(merged[name], b[name] + w * (x[name] - b[name]))

    expect("model.embed_tokens.weight", 0.2)  # first slice, t = 0
    expect("model.layers.0.mlp.up_proj.weight", 0.6)  # one-layer slice: t = 1
    expect("model.layers.1.mlp.up_proj.weight", 0.8)
    expect("model.norm.weight", 0.4)  # last slice, t = 0
    expect("lm_head.weight", 0.4)


def test_models_form_gradient_and_filters(llama):
    base, ft1, ft2 = llama
    b, x1, x2 = load_folder(base), load_folder(ft1), load_folder(ft2)
    recipe = Recipe.from_dict({
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": str(ft1), "parameters": {"weight": [0.3, 0.9]}},
                   {"model": str(ft2), "parameters": {
                       "weight": [{"filter": "mlp", "value": 1.0}, {"value": 0.1}]}}]})
    merged = merge_state_dict(recipe)
    for name, w1, w2 in [("model.layers.0.mlp.down_proj.weight", 0.3, 1.0),
                         ("model.layers.1.self_attn.q_proj.weight", 0.9, 0.1),
                         ("model.norm.weight", 0.3, 0.1), ("lm_head.weight", 0.3, 0.1)]:
        expected = b[name] + w1 * (x1[name] - b[name]) + w2 * (x2[name] - b[name])
        torch.testing.assert_close(merged[name], expected)


def test_slices_change_the_layer_count(tmp_path, llama):
    from transformers import AutoModelForCausalLM

    base, ft1, _ = llama
    recipe = Recipe.from_dict({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(base), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(ft1), "layer_range": [1, 2]}]}]})
    out = write_merged_model(recipe, tmp_path / "stack")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    merged, x = load_folder(out), load_folder(ft1)
    assert torch.equal(merged["model.layers.2.mlp.up_proj.weight"],
                       x["model.layers.1.mlp.up_proj.weight"])
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3


# --- bad inputs: each fails before any tensor is read ----------------------------------------------


@pytest.fixture
def no_tensor_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read before the inputs were checked")

    monkeypatch.setattr(sources_mod.SourceModel, "read", refuse)


def test_missing_folder_no_config_not_causal(tmp_path, llama, no_tensor_reads):
    base, ft1, _ = llama
    with pytest.raises(MergeError, match="model folder '.*nope' does not exist"):
        merge_state_dict(ta_recipe(base, [tmp_path / "nope"], weights=(1.0,)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MergeError, match="has no config.json"):
        merge_state_dict(ta_recipe(base, [empty], weights=(1.0,)))
    bert = tmp_path / "bert"
    shutil.copytree(ft1, bert)
    cfg = json.loads((bert / "config.json").read_text())
    cfg["architectures"] = ["BertModel"]
    (bert / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match="not a causal language model"):
        merge_state_dict(ta_recipe(base, [bert], weights=(1.0,)))


@pytest.mark.parametrize("other,message", [
    (dict(arch="qwen2"), "different architectures"),
    (dict(layers=3), "different layer counts"),
    (dict(hidden=32), "different hidden sizes"),
    (dict(tied=True), "different tensors: .*ties lm_head"),
    (dict(vocab=110), "different shapes of (lm_head|model.embed_tokens).weight.*tokenizer_source"),
])
def test_incompatible_models(tmp_path, llama, no_tensor_reads, other, message):
    base = llama[0]
    odd = save_model(tmp_path / "odd", tiny_config(**{"arch": "llama", **other}), seed=5)
    with pytest.raises(MergeError, match=message):
        merge_state_dict(ta_recipe(base, [odd], weights=(1.0,)))


def _tokenizer_variant(kind: str):
    from evomerge.zoo.tokenizer import ROLE_TOKENS, build_tokenizer

    tok = build_tokenizer()
    if kind == "eos":
        tok.eos_token = "<|assistant|>"  # same vocabulary, other special token
    elif kind == "swap":  # same size, two tokens trade ids
        data = json.loads(tok.backend_tokenizer.to_str())
        vocab = data["model"]["vocab"]
        vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                                      bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                      pad_token="<pad>",
                                      additional_special_tokens=list(ROLE_TOKENS))
    return tok


@pytest.mark.parametrize("kind,message", [("eos", "special tokens differ.*eos_token"),
                                          ("swap", "vocabularies differ.*different ids")])
def test_different_tokenizers_refused(tmp_path, llama, no_tensor_reads, kind, message):
    base = llama[0]
    other = save_model(tmp_path / kind, tiny_config(), seed=3, tokenizer=_tokenizer_variant(kind))
    with pytest.raises(MergeError, match=f"different tokenizers: .*{message}.*tokenizer_source"):
        merge_state_dict(ta_recipe(base, [other], weights=(1.0,)))


def test_missing_required_parameter(llama, no_tensor_reads):
    base, ft1, _ = llama
    recipe = Recipe.from_dict({"merge_method": "ties", "base_model": str(base),
                               "models": [{"model": str(ft1)}]})
    with pytest.raises(MergeError, match="missing parameter 'weight' for model .*ft1"):
        merge_state_dict(recipe)


def test_base_must_be_in_every_slice(llama, no_tensor_reads):
    base, ft1, _ = llama
    recipe = Recipe.from_dict({"merge_method": "ties", "base_model": str(base), "slices": [
        {"sources": [{"model": str(ft1), "layer_range": [0, 2], "parameters": {"weight": 1}}]}]})
    with pytest.raises(MergeError, match="base model .* must be one of the slice's sources"):
        merge_state_dict(recipe)


# --- tokenizer_source ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extra_token_model(tmp_path_factory, llama):
    """A fine-tune of the llama base whose tokenizer has one more token (row 103)."""
    from evomerge.zoo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    tok.add_tokens(["<|extra|>"], special_tokens=True)
    b = load_folder(llama[0])
    state = {k: v + 0.01 for k, v in b.items()}
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        state[k] = torch.cat([state[k], torch.full((1, state[k].shape[1]), 3.0)])
    path = tmp_path_factory.mktemp("extra") / "extra"
    save_model(path, tiny_config(vocab=104), tokenizer=tok)
    from safetensors.torch import save_file

    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_tokenizer_source_base_drops_the_extra_token(tmp_path, llama, extra_token_model):
    base = llama[0]
    recipe = ta_recipe(base, [extra_token_model], weights=(0.5,), tokenizer_source="base")
    merged = merge_state_dict(recipe)
    b = load_folder(base)
    emb = "model.embed_tokens.weight"
    assert merged[emb].shape == (103, 16)
    torch.testing.assert_close(merged[emb], b[emb] + 0.5 * 0.01)


def test_tokenizer_source_model_fills_missing_rows(tmp_path, llama, extra_token_model):
    base, ft1, _ = llama
    recipe = ta_recipe(base, [ft1, extra_token_model], weights=(0.5, 0.5),
                       tokenizer_source=str(extra_token_model))
    out = write_merged_model(recipe, tmp_path / "out")
    merged, b, x1 = load_folder(out), load_folder(base), load_folder(ft1)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 104
    assert (out / "tokenizer.json").read_bytes() == (extra_token_model / "tokenizer.json"
                                                     ).read_bytes()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[name].shape == (104, 16)
        # tokens every model has: plain task arithmetic
        torch.testing.assert_close(
            merged[name][:103], b[name] + 0.5 * (x1[name] - b[name]) + 0.5 * 0.01)
        # the token only one model has: every model gets that model's row -> the row itself
        torch.testing.assert_close(merged[name][103], torch.full((16,), 3.0))


# --- sparsified deltas at the edges of their parameters -----------------------------------------


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_at_density_zero_merge_the_base_without_nan(llama, method):
    base, ft1, ft2 = llama
    expected = load_folder(base)
    for rescale in ({}, {"rescale": True}, {"rescale": True, "rescale_mode": "inverse_density"}):
        recipe = Recipe.from_dict({
            "merge_method": method, "base_model": str(base), "parameters": rescale,
            "models": [{"model": str(m), "parameters": {"weight": 0.7, "density": 0.0}}
                       for m in (ft1, ft2)]})
        merged = merge_state_dict(recipe)
        assert all(torch.isfinite(v).all() for v in merged.values()), rescale
        assert all(torch.equal(merged[k], expected[k]) for k in merged), rescale


def della_recipe(base: Path, fts: list[Path], params: list[dict]) -> Recipe:
    return Recipe.from_dict({
        "merge_method": "della", "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 0.5, **p}}
                   for m, p in zip(fts, params, strict=True)]})


def test_della_density_is_checked_against_each_sources_own_epsilon(llama, no_tensor_reads):
    """0.1 - 0.15 < 0: the second source is refused by name before any tensor is read, while the
    first one's density 0.1 is fine with its own epsilon 0.05."""
    base, ft1, ft2 = llama
    recipe = della_recipe(base, [ft1, ft2], [{"density": 0.1, "epsilon": 0.05},
                                             {"density": 0.1, "epsilon": 0.15}])
    with pytest.raises(MergeError) as err:
        merge_state_dict(recipe)
    message = str(err.value)
    assert message.startswith(f"model {ft2}, tensor ") and f"model {ft1}," not in message
    assert "density=0.1, epsilon=0.15" in message


def test_della_accepts_a_density_that_only_another_sources_epsilon_would_refuse(llama):
    base, ft1, ft2 = llama
    recipe = della_recipe(base, [ft1, ft2], [{"density": 0.1, "epsilon": 0.05},
                                             {"density": 0.5, "epsilon": 0.3}])
    merged = merge_state_dict(recipe)
    assert merged and all(torch.isfinite(v).all() for v in merged.values())


# --- weight files that are not whole safetensors ------------------------------------------------


@pytest.mark.parametrize("kind,message", [
    ("truncated", r"is truncated: its tensors need \d+ bytes, the file has \d+"),
    ("header cut", r"is truncated: its header alone needs \d+ bytes, the file has 100"),
    ("tiny", r"is 5 bytes long, too short for a safetensors header"),
    ("not safetensors", r"is not a safetensors file \(its first 8 bytes"),
    ("not json", r"is not a safetensors file \(its header is not JSON\)"),
    ("trailing bytes", r"is not a valid safetensors file: 7 bytes follow its last tensor"),
])
def test_broken_safetensors_named_before_any_read(tmp_path, llama, no_tensor_reads, kind,
                                                  message):
    from safetensors import SafetensorError

    base, ft1, _ = llama
    broken = tmp_path / "broken"
    shutil.copytree(ft1, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({
        "truncated": data[: len(data) - 1000],
        "header cut": data[:100],
        "tiny": data[:5],
        "not safetensors": b"version https://git-lfs.github.com/spec/v1\n" * 10,
        "not json": (24).to_bytes(8, "little") + b"\xff" * 24 + b"\0" * 64,
        "trailing bytes": data + b"garbage",
    }[kind])
    with pytest.raises(MergeError, match=f"^{re.escape(str(weights))} {message}"):
        merge_state_dict(ta_recipe(base, [broken], weights=(1.0,)))
    from evomerge.models.folders import ModelFolderError, check_model_dir

    with pytest.raises(ModelFolderError, match=f"^{re.escape(str(weights))} {message}"):
        check_model_dir(broken)
    with pytest.raises(SafetensorError):  # what the library itself says
        from safetensors import safe_open

        with safe_open(weights, framework="pt"):
            pass


def test_a_broken_shard_of_a_sharded_model_is_named(tmp_path, llama):
    from transformers import AutoModelForCausalLM

    base, ft1, _ = llama
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(ft1).save_pretrained(sharded, max_shard_size="20KB")
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(MergeError, match=f"^{re.escape(str(shard))} is truncated"):
        merge_state_dict(ta_recipe(base, [sharded], weights=(1.0,)))

