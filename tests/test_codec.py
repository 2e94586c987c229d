"""The genome codec: bounds, starting point, groups, and the recipe's per-group values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from merge_helpers import load_folder

from evomerge.merge.engine import merge_state_dict
from evomerge.models.sources import load_source
from evomerge.search.codecs.parameter import Codec, RecipeSettings
from evomerge.search.spaces.parameter import SearchSpace


def space(**kw) -> SearchSpace:
    data = {"method": "task_arithmetic", "parameters": {"weight": {"low": 0.0, "high": 2.0, "init": 1.0}},
            "granularity": {"layers_per_group": 2, "embeddings": "own"}}
    data.update(kw)
    return SearchSpace.model_validate(data)


@pytest.fixture(scope="module")
def zoo(zoo_dir):
    specs = [str(zoo_dir / f"spec_{s}") for s in ("add", "rev", "sub")]
    return str(zoo_dir / "base"), specs, load_source(str(zoo_dir / "base")).layout


def test_genes_start_and_round_trip(zoo):
    base, specs, layout = zoo
    c = Codec(space(), specs, base, layout)
    # 3 models x (embed, layers 0-1, layers 2-3, head)
    assert c.dim == 12 and c.groups == ["embed", "layers 0-1", "layers 2-3", "head"]
    assert np.allclose(c.x0, 0.5)  # init 1.0 in [0, 2]
    x = np.random.default_rng(0).random(c.dim)
    assert np.allclose(c.encode(c.decode(x)), x)
    assert c.decode(np.full(c.dim, 7.0))[(specs[0], "weight", "embed")] == 2.0  # clipped to the cube


def test_recipe_puts_each_group_value_on_its_tensors(zoo):
    base, specs, layout = zoo
    c = Codec(space(), specs, base, layout)
    values = {(g.model, g.param, g.group): 0.1 * (i + 1) for i, g in enumerate(c.genes)}
    recipe = c.to_recipe(c.encode(values))
    merged = merge_state_dict(recipe)
    b = load_folder(base)
    srcs = {s: load_folder(s) for s in specs}

    def expected(name, group):
        return b[name] + sum(values[(s, "weight", group)] * (t[name] - b[name]) for s, t in srcs.items())

    for name, group in [("model.embed_tokens.weight", "embed"), ("model.layers.1.mlp.up_proj.weight", "layers 0-1"),
                        ("model.layers.2.self_attn.q_proj.weight", "layers 2-3"), ("model.norm.weight", "head"),
                        ("lm_head.weight", "head")]:
        assert torch.allclose(merged[name], expected(name, group), atol=1e-6), name


def test_split_attention_and_mlp(zoo):
    base, specs, layout = zoo
    c = Codec(space(granularity={"layers_per_group": 4, "split_attn_mlp": True, "embeddings": "with_layers"}),
              specs, base, layout)
    assert c.groups == ["layers 0-3 attn", "layers 0-3 mlp"]
    values = {(g.model, g.param, g.group): (0.2 if g.group.endswith("attn") else 1.7) for g in c.genes}
    recipe = c.to_recipe(c.encode(values))
    entries = recipe.slices[0].sources[0].parameters["weight"]
    by_filter = {e["filter"]: e["value"] for e in entries}
    assert by_filter[".self_attn."] == pytest.approx(0.2) and by_filter[".input_layernorm."] == pytest.approx(0.2)
    assert by_filter[".mlp."] == pytest.approx(1.7) and by_filter[".post_attention_layernorm."] == pytest.approx(1.7)


def test_granularity_must_divide_layers(zoo):
    base, specs, layout = zoo
    with pytest.raises(ValueError, match="does not divide the 4 layers"):
        Codec(space(granularity={"layers_per_group": 3}), specs, base, layout)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tied_embeddings_make_one_group(tmp_path, arch):
    from merge_helpers import model_family

    folders = model_family(tmp_path, arch, n=2, tied=True, layers=2)
    layout = load_source(str(folders[0])).layout
    c = Codec(space(granularity={"layers_per_group": 1}), [str(f) for f in folders[1:]], str(folders[0]), layout,
              RecipeSettings())
    assert c.groups[0] == "embed+head" and "head" not in c.groups
    merge_state_dict(c.to_recipe(c.x0))  # a valid recipe for the tied model
