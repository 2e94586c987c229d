"""Search spaces of the whole-tensor methods: slerp's t per layer group (layer_parameters), the
shipped spaces, and mergekit-evolve's genome options refused with their evomerge form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from merge_helpers import load_folder

from evomerge.merge.engine import merge_state_dict
from evomerge.methods.slerp import slerp
from evomerge.models.sources import load_source
from evomerge.search.codecs.parameter import Codec
from evomerge.search.spaces.parameter import SearchSpace

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


@pytest.mark.parametrize("name", ["ps_slerp", "ps_nuslerp", "ps_multislerp", "ps_sce"])
def test_the_shipped_spaces_load(name):
    assert SearchSpace.load(SPACES / f"{name}.yaml").method == name[3:]


def test_slerp_t_per_layer_group_lands_on_its_tensors(zoo_dir):
    rev, sub = str(zoo_dir / "spec_rev"), str(zoo_dir / "spec_sub")
    space = SearchSpace.load(SPACES / "ps_slerp.yaml")
    c = Codec(space, [sub], rev, load_source(rev).layout)
    assert c.groups == ["embed", "layers 0-1", "layers 2-3", "head"] and c.dim == 4
    assert all(g.model is None and g.param == "t" for g in c.genes)
    assert np.allclose(c.x0, 0.5)
    values = {(None, "t", g): t for g, t in zip(c.groups, (0.1, 0.3, 0.6, 0.9), strict=True)}
    recipe = c.to_recipe(c.encode(values))
    assert recipe.merge_method == "slerp" and recipe.base_model == rev
    merged, a, b = merge_state_dict(recipe), load_folder(rev), load_folder(sub)
    for name, t in [("model.embed_tokens.weight", 0.1), ("model.layers.1.mlp.up_proj.weight", 0.3),
                    ("model.layers.2.self_attn.q_proj.weight", 0.6), ("lm_head.weight", 0.9)]:
        assert torch.equal(merged[name], slerp(t, a[name], b[name])), name


@pytest.mark.parametrize("key,hint", [
    ("allow_negative_weights", "negative low bound"), ("normalize", "fixed: {normalize"),
    ("smooth", "not a genome option"), ("filters", "split_attn_mlp"),
    ("layer_granularity", "layers_per_group")])
def test_mergekit_evolve_genome_options_are_refused_with_their_evomerge_form(key, hint):
    with pytest.raises(ValueError, match=f"{key}: a mergekit-evolve genome option; here .*{hint}"):
        SearchSpace.model_validate({"method": "ties", key: True,
                                    "parameters": {"weight": {"low": 0.0, "high": 1.0}}})


def test_a_space_with_nothing_to_search_or_a_mistyped_fixed_option_is_refused():
    with pytest.raises(ValueError, match="model_stock has no numeric parameter to search .*fixed"):
        SearchSpace.model_validate({"method": "model_stock", "parameters": {},
                                    "fixed": {"filter_wise": True}})
    with pytest.raises(ValueError, match="fixed.nuslerp_flatten: .* must be true or false"):
        SearchSpace.model_validate({"method": "nuslerp", "fixed": {"nuslerp_flatten": 0.5},
                                    "parameters": {"weight": {"low": 0.0, "high": 1.0}}})
    with pytest.raises(ValueError, match="select_topk"):
        SearchSpace.model_validate({"method": "sce", "parameters": {},
                                    "global_parameters": {"select_topk": {"low": 0.0,
                                                                          "high": 1.0}}})


def test_a_slerp_search_over_too_many_models_is_refused_before_anything_loads(zoo_dir, tmp_path,
                                                                              capsys):
    import yaml

    from evomerge.cli.main import main

    cfg = {"models": [str(zoo_dir / "spec_add"), str(zoo_dir / "spec_sub")],
           "base_model": str(zoo_dir / "spec_rev"), "search_space": "ps_slerp",
           "tasks": [{"name": "zoo_rev", "limit": 4}], "budget": {"generations": 1},
           "run_dir": str(tmp_path / "run")}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    assert main(["search", str(tmp_path / "c.yml"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "models: slerp takes at most 2 source" in err or "slerp takes exactly 2" in err, err
    assert not (tmp_path / "run").exists()


def test_the_zoo_table_rows_of_the_new_methods_are_valid_recipes(zoo_dir):
    from evomerge.recipes.parameter_space import Recipe
    from evomerge.zoo.table import method_merge_recipes

    recipes = {n: Recipe.from_dict(r) for n, r in method_merge_recipes(zoo_dir).items()}
    assert sorted(r.merge_method for r in recipes.values()) == [
        "iso_c", "iso_cts", "karcher", "model_stock", "nuslerp", "sce", "slerp", "tsv"]
