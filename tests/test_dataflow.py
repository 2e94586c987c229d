"""Data-flow merging on tiny random models: folding, the in-memory path, KV cache, export, codec."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from merge_helpers import model_family, tiny_config

from evomerge.merge.dataflow import assemble
from evomerge.merge.writer import write_path_model
from evomerge.models.architectures import ArchitectureError
from evomerge.models.folders import load_causal_lm
from evomerge.recipes.fold import FoldError, passthrough_recipe
from evomerge.recipes.layer_path import PathRecipe, load_recipe, load_stages
from evomerge.recipes.parameter_space import RecipeError
from evomerge.runs.export import mergekit_yaml
from evomerge.search.codecs.dataflow import PathCodec
from evomerge.search.spaces.dataflow import DfsSpace

ARCHS = ["llama", "mistral", "qwen2", "gpt2"]
LAYERS = 2  # per model; two models: M = 4 source layers


def _stream_of_trained_magnitude(folder: Path) -> None:
    """Random init gives a residual stream of rms 0.02, where a norm's epsilon is 0.25% of the
    signal; trained models carry rms ~1 (the zoo's: 0.9). Embedding rows scaled to rms 1."""
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    state = load_file(f)
    for k, v in state.items():
        if any(e in k for e in ("embed_tokens", "wte", "wpe")):
            state[k] = v / v.pow(2).mean().sqrt()
    save_file(state, f, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("dfs")
    out = {}
    for arch in ARCHS:
        folders = model_family(root, arch, n=1, layers=LAYERS, hidden=32)
        for f in folders:
            _stream_of_trained_magnitude(f)
        out[arch] = [str(f) for f in folders]
    return out


@pytest.fixture(scope="module")
def loaded(families) -> dict[str, dict[str, torch.nn.Module]]:
    torch.set_num_threads(1)
    return {arch: {n: load_causal_lm(n) for n in names} for arch, names in families.items()}


def random_path(names: list[str], n_steps: int, rng: np.random.Generator, low=0.5, high=2.0) -> PathRecipe:
    """A path from model A's first to its last layer, random layers and log-uniform scales between."""
    steps = [{"model": names[0], "layer": 0, "scale": 1.0}]
    for _ in range(n_steps - 2):
        steps.append({"model": names[int(rng.integers(len(names)))], "layer": int(rng.integers(LAYERS)),
                      "scale": float(np.exp(rng.uniform(np.log(low), np.log(high))))})
    steps.append({"model": names[0], "layer": LAYERS - 1, "scale": float(np.exp(rng.uniform(np.log(low), np.log(high))))})
    return PathRecipe.from_dict({"path": steps, "dtype": "float32"})


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------- fold
@pytest.mark.parametrize("arch", ARCHS)
def test_folded_model_equals_the_scaled_path(arch, families, loaded, tmp_path, capsys):
    names, rng = families[arch], np.random.default_rng(ARCHS.index(arch))
    m = 2 * LAYERS
    worst = 0.0
    for k, n_steps in enumerate((2, m, 2 * m, 3 * m, 3 * m)):
        recipe = random_path(names, n_steps, rng)
        path_model = assemble(recipe, loaded[arch])
        folded = load_causal_lm(write_path_model(recipe, tmp_path / f"fold{k}"))
        assert folded.config.num_hidden_layers == n_steps
        diff = (logits(path_model, IDS) - logits(folded, IDS)).abs().max().item()
        worst = max(worst, diff)
        assert diff < 1e-4, (n_steps, recipe.scale_products(), diff)
    with capsys.disabled():
        print(f"\n[fold] {arch}: max |logit diff| over paths of 2..{3 * m} steps, scales in [0.5, 2]: {worst:.2e}")


@pytest.mark.parametrize("arch", ARCHS)
def test_extreme_scale_products_are_reported(arch, families, loaded, tmp_path, capsys):
    """At products 1e-3 / 1e3 the norms' epsilon starts to show: the values are printed, and the
    space bounds the product (max_scale_product) so that searches stay where folding is exact."""
    names = families[arch]
    for product in (1e-3, 1e3):
        w = product ** (1 / 3)
        steps = [{"model": names[0], "layer": 0, "scale": 1.0}, {"model": names[1], "layer": 1, "scale": w},
                 {"model": names[1], "layer": 0, "scale": w}, {"model": names[0], "layer": 1, "scale": w}]
        recipe = PathRecipe.from_dict({"path": steps, "dtype": "float32"})
        assert recipe.scale_products()[-1] == pytest.approx(product)
        folded = load_causal_lm(write_path_model(recipe, tmp_path / f"p{product:g}"))
        diff = (logits(assemble(recipe, loaded[arch]), IDS) - logits(folded, IDS)).abs().max().item()
        with capsys.disabled():
            print(f"\n[fold] {arch}: scale product {product:g}: max |logit diff| {diff:.2e}")
        assert np.isfinite(diff)
    with pytest.raises(FoldError, match=r"product of the scales .* outside"):
        bad = PathRecipe.from_dict({"path": [{"model": names[0], "layer": 0},
                                             {"model": names[0], "layer": 1, "scale": 1e5}]})
        passthrough_recipe(bad)


def test_the_path_shares_weights_and_remaps_layer_idx(families, loaded):
    names = families["qwen2"]
    recipe = PathRecipe.from_dict({"path": [{"model": names[0], "layer": 0}, {"model": names[1], "layer": 1},
                                            {"model": names[0], "layer": 0, "scale": 1.5},
                                            {"model": names[0], "layer": 1}]})
    model = assemble(recipe, loaded["qwen2"])
    source_ptrs = {p.data_ptr() for m in loaded["qwen2"].values() for p in m.parameters()}
    assert {p.data_ptr() for p in model.parameters()} <= source_ptrs  # no weight was copied
    layers = model.model.layers
    assert [la.self_attn.layer_idx for la in layers] == [0, 1, 2, 3]
    assert layers[0].self_attn.q_proj.weight is layers[2].self_attn.q_proj.weight
    assert loaded["qwen2"][names[0]].model.layers[0].self_attn.layer_idx == 0  # the source is untouched
    assert not loaded["qwen2"][names[0]].model.layers[0]._forward_pre_hooks
    assert model.config.num_hidden_layers == 4 and len(model.config.layer_types) == 4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_generation_with_cache_equals_without(arch, families, loaded):
    names = families[arch]
    steps = [{"model": names[0], "layer": 0}] + [
        {"model": names[i % 2], "layer": i % LAYERS, "scale": 0.8 + 0.1 * i} for i in range(6)]
    model = assemble(PathRecipe.from_dict({"path": steps}), loaded[arch])
    prompt = IDS[:1, :5]
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        uncached = model.generate(prompt, use_cache=False, **kw)
    assert cached.shape[1] == 15
    assert torch.equal(cached, uncached)


# ---------------------------------------------------------------------------------------- export
def test_evomerge_merge_builds_both_exports_with_the_paths_logits(families, loaded, tmp_path):
    from evomerge.cli.main import main as evomerge

    names = families["mistral"]
    recipe = random_path(names, 7, np.random.default_rng(7))
    (tmp_path / "path.yaml").write_text(recipe.to_yaml())
    (tmp_path / "path.mergekit.yaml").write_text(mergekit_yaml(recipe, "test"))
    mk = yaml.safe_load((tmp_path / "path.mergekit.yaml").read_text())
    assert mk["merge_method"] == "passthrough" and len(mk["slices"]) == 7
    assert all(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] == 1 for s in mk["slices"])
    expected = logits(assemble(recipe, loaded["mistral"]), IDS)
    for name in ("path.yaml", "path.mergekit.yaml"):
        assert evomerge(["merge", str(tmp_path / name), str(tmp_path / f"out-{name}")]) == 0
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tmp_path / f"out-{name}")  # as it is
        assert (logits(model, IDS) - expected).abs().max().item() < 1e-5, name


def test_recipe_round_trip_and_errors(families):
    names = families["llama"]
    recipe = PathRecipe.from_dict({"path": [{"model": names[0], "layer": 0}, {"model": names[1], "layer": 1,
                                                                              "scale": 0.75}]})
    assert recipe.embeddings == names[0] and recipe.head == names[1]
    again = PathRecipe.from_yaml(recipe.to_yaml())
    assert again == recipe and again.hash() == recipe.hash()
    assert "- {model:" in recipe.to_yaml()  # one step a line
    with pytest.raises(RecipeError, match=r"path\.0\.scale.*> 0"):
        PathRecipe.from_dict({"path": [{"model": names[0], "layer": 0, "scale": -1.0}]})
    with pytest.raises(RecipeError, match=r"path.*at least 1"):
        PathRecipe.from_dict({"path": []})
    with pytest.raises(ArchitectureError, match=r"layer 5 of .* does not exist"):
        passthrough_recipe(PathRecipe.from_dict({"path": [{"model": names[0], "layer": 5}]}))
    with pytest.raises(FoldError, match=r"embeddings from the first step's model"):
        passthrough_recipe(recipe.model_copy(update={"embeddings": names[1]}))


def test_unknown_architecture_is_refused(tmp_path):
    import transformers as tf
    from merge_helpers import save_model

    folder = save_model(tmp_path / "bloom", tf.BloomConfig(vocab_size=103, hidden_size=16, n_layer=2, n_head=2))
    recipe = PathRecipe.from_dict({"path": [{"model": str(folder), "layer": 0}]})
    with pytest.raises(ArchitectureError, match=r"supports model types .*; 'bloom' is refused \(its blocks are not"):
        passthrough_recipe(recipe)
    from evomerge.models.architectures import arch_spec

    with pytest.raises(ArchitectureError, match="post-norm"):
        arch_spec({"model_type": "olmo2"})


def test_tied_head_must_follow_the_embeddings(tmp_path):
    from merge_helpers import save_model

    cfg = tiny_config("llama", tied=True)
    a, b = save_model(tmp_path / "a", cfg, seed=0), save_model(tmp_path / "b", cfg, seed=1)
    recipe = PathRecipe.from_dict({"path": [{"model": str(a), "layer": 0}, {"model": str(b), "layer": 1}]})
    with pytest.raises(ArchitectureError, match="ties lm_head to its embeddings"):
        passthrough_recipe(recipe)


def test_staged_recipe_file_builds_stage_by_stage(families, loaded, tmp_path):
    """A PS stage named `ps`, then a path that uses `ps` as a model: `evomerge merge` builds both."""
    from evomerge.cli.main import main as evomerge

    base, ft = families["llama"]
    ps = {"name": "ps", "merge_method": "linear", "models": [{"model": base, "parameters": {"weight": 0.5}},
                                                             {"model": ft, "parameters": {"weight": 0.5}}]}
    path = {"path": [{"model": "ps", "layer": 0}, {"model": ft, "layer": 1, "scale": 1.2},
                     {"model": "ps", "layer": 1, "scale": 0.9}], "dtype": "float32"}
    f = tmp_path / "staged.yaml"
    f.write_text(yaml.safe_dump(ps) + "---\n" + yaml.safe_dump(path))
    stages = load_stages(f)
    assert [n for n, _ in stages] == ["ps", None] and isinstance(load_recipe(f), PathRecipe)
    assert evomerge(["merge", str(f), str(tmp_path / "out")]) == 0
    assert not list(tmp_path.glob(".out.stages-*"))  # the intermediate stage is removed
    assert evomerge(["merge", str(tmp_path / "ps.yaml"), str(tmp_path / "x")]) == 2  # (no such file)
    # the same model by hand: the linear merge, then the path over it
    (tmp_path / "ps.yaml").write_text(yaml.safe_dump({k: v for k, v in ps.items() if k != "name"}))
    assert evomerge(["merge", str(tmp_path / "ps.yaml"), str(tmp_path / "ps")]) == 0
    by_hand = json.loads(json.dumps(path).replace('"ps"', json.dumps(str(tmp_path / "ps"))))
    recipe = PathRecipe.from_dict(by_hand)
    sources = {str(tmp_path / "ps"): load_causal_lm(tmp_path / "ps"), ft: loaded["llama"][ft]}
    expected = logits(assemble(recipe, sources), IDS)
    got = logits(load_causal_lm(tmp_path / "out"), IDS)
    assert (got - expected).abs().max().item() < 1e-5
    f.write_text(yaml.safe_dump(path) + "---\n" + yaml.safe_dump(ps))
    with pytest.raises(RecipeError, match="needs a `name`"):
        load_stages(f)


# ---------------------------------------------------------------------------------------- codec
def space(**over) -> DfsSpace:
    return DfsSpace.model_validate({"kind": "dfs", **over})


def test_codec_starts_at_model_a_and_keeps_its_bounds():
    codec = PathCodec(space(scale={"param": "matrix"}), ["A", "B"], [4, 4])
    assert len(codec.slots) == 3 * (8 - 2) and codec.dim == 18 + 64  # A0 and A3 are fixed: no slots
    start = codec.to_recipe(codec.x0)
    assert [(s.model, s.layer, s.scale) for s in start.path] == [("A", i, 1.0) for i in range(4)]
    assert start.embeddings == start.head == "A"
    # everything kept, every scale at its high end: the length bound and the product bound hold
    codec = PathCodec(space(max_path_length=9, max_scale_product=4.0), ["A", "B"], [4, 4])
    path = codec.to_recipe(np.ones(codec.dim)).path
    assert len(path) == 9 and (path[0].model, path[0].layer) == ("A", 0) and (path[-1].model, path[-1].layer) == ("A", 3)
    assert max(PathRecipe(path=path, embeddings="A", head="A").scale_products()) == pytest.approx(4.0)
    # nothing kept, fix_ends off: one step, the slot with the highest gene
    codec = PathCodec(space(fix_ends=False, scale={"param": "none"}), ["A", "B"], [2, 3])
    x = np.zeros(codec.dim)
    x[7] = 0.4
    assert [(s.model, s.layer) for s in codec.to_recipe(x).path] == [(codec.models[codec.slots[7].model], codec.slots[7].layer)]


def test_space_errors():
    with pytest.raises(ValueError, match="max_path_length must be >= 2"):
        space(max_path_length=1)
    with pytest.raises(ValueError, match="low must be < high"):
        space(scale={"low": 2.0, "high": 1.0})
    with pytest.raises(ValueError, match="exceeds the"):
        PathCodec(space(max_path_length=100), ["A", "B"], [4, 4])
    with pytest.raises(ValueError, match="init.model_a"):
        space(init={"model_a": 0.4})
    with pytest.raises(ValueError, match="less than or equal to 10000"):
        space(max_scale_product=1e5)  # beyond what the fold accepts


def test_dfs_config_errors_come_before_any_model_loads(families, tmp_path, monkeypatch):
    import evomerge.models.folders as models
    import evomerge.search.loop as driver
    from evomerge.runs.start import run_search
    from evomerge.search.config import ConfigError, SearchConfig

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(models, "load_causal_lm", boom)
    monkeypatch.setattr(driver, "load_tokenizer", boom)
    base = {"models": families["llama"], "search_space": {"kind": "dfs"}, "tasks": [{"name": "zoo_add"}],
            "budget": {"generations": 1}, "run_dir": str(tmp_path / "run")}
    cases = [({"base_model": families["llama"][0]}, "a data-flow .* search has no base model"),
             ({"search_space": {"kind": "dfs", "repeat": 2}}, r"search_space\.repeat: unknown key"),
             ({"search_space": {"kind": "dfs", "max_path_length": 99}}, "max_path_length=99 exceeds"),
             ({"models": [families["llama"][0], families["gpt2"][0]]}, "model_type='gpt2'")]
    for over, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            run_search(SearchConfig.from_dict({**base, **over}), quiet=True)
        assert not (tmp_path / "run").exists()


def test_staged_config_errors(families):
    from evomerge.runs.staged import StagedConfig
    from evomerge.search.config import ConfigError

    a, b = families["llama"]
    common = {"tasks": [{"name": "zoo_add"}], "budget": {"generations": 1}}
    ps = {"name": "ps", "models": [b], "base_model": a, "search_space": "ps_task_arithmetic"}
    dfs = {"name": "dfs", "models": ["stage:ps", b], "search_space": "dfs"}
    StagedConfig.from_dict({**common, "stages": [ps, dfs]})  # valid
    cases = [([dfs, ps], "names no earlier stage"), ([ps, dict(ps)], "named twice"),
             ([ps, {**dfs, "run_dir": "x"}], "set run_dir at the top level"), ([], "non-empty list"),
             ([ps, {**dfs, "search_space": {"kind": "dfs", "repeats": 0}}], r"stages\.1 \(dfs\).*repeats")]
    for stages, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            StagedConfig.from_dict({**common, "stages": stages})
