"""Recipe model: loading mergekit YAML, validation messages, hashing, parameter resolution."""

from __future__ import annotations

import pytest

from evomerge.recipes.parameter_space import (
    Recipe,
    RecipeError,
    evaluate_setting,
    layer_t,
    parameter_scopes,
    resolve_parameter,
)

MERGEKIT_TIES = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""

MERGEKIT_SLICES = """
slices:
  - sources:
      - model: a
        layer_range: [0, 4]
      - model: b
        layer_range: [0, 4]
        parameters: {weight: 0.9}
    parameters: {weight: 0.2}
  - sources:
      - model: a
        layer_range: [4, 6]
      - model: b
        layer_range: [4, 6]
merge_method: linear
parameters:
  weight: 0.5
"""


def test_mergekit_yaml_loads_as_is():
    r = Recipe.from_yaml(MERGEKIT_TIES)
    assert r.merge_method == "ties" and r.dtype == "float16" and r.mask_seed == 0
    assert r.models[1].parameters["weight"] == [0, 0.3, 0.7, 1]
    assert r.models[2].parameters["weight"][0] == {"filter": "mlp", "value": 0.5}
    assert Recipe.from_yaml(MERGEKIT_SLICES).slices[1].sources[1].layer_range == (4, 6)


def test_yaml_round_trip_and_hash():
    r = Recipe.from_yaml(MERGEKIT_TIES)
    again = Recipe.from_yaml(r.to_yaml())
    assert again == r and again.hash() == r.hash()
    assert "mask_seed" not in r.to_yaml()  # a plain TIES recipe stays mergekit-clean
    # 1 and 1.0 are the same parameter value; key order does not matter
    a = Recipe.from_yaml("merge_method: linear\nmodels: [{model: x, parameters: {weight: 1}}]")
    b = Recipe.from_yaml("models: [{parameters: {weight: 1.0}, model: x}]\nmerge_method: linear")
    assert a.hash() == b.hash()
    c = Recipe.from_yaml("merge_method: linear\nmodels: [{model: x, parameters: {weight: 2}}]")
    assert c.hash() != a.hash()
    dare = Recipe.from_yaml("merge_method: dare_ties\nbase_model: b\nmask_seed: 5\n"
                            "models: [{model: x, parameters: {weight: 1, density: 0.5}}]")
    assert "mask_seed: 5" in dare.to_yaml()
    assert dare.hash() != dare.model_copy(update={"mask_seed": 6}).hash()


def test_save_and_load(tmp_path):
    r = Recipe.from_yaml(MERGEKIT_SLICES)
    r.save(tmp_path / "r.yml")
    assert Recipe.load(tmp_path / "r.yml") == r


def test_recipe_is_frozen():
    r = Recipe.from_yaml(MERGEKIT_TIES)
    with pytest.raises(ValueError):
        r.merge_method = "linear"


@pytest.mark.parametrize("text,message", [
    ("merge_method: tie\nbase_model: b\nmodels: [{model: x}]", "merge_method: unknown merge_"
     "method 'tie'; valid: .*ties"),
    ("merge_method: ties\nmodels: [{model: x, parameters: {weight: 1}}]",
     "base_model: merge_method 'ties' needs a base_model"),
    ("merge_method: linear\nmodels: [{model: x, parameters: {wieght: 1}}]",
     "models.0.parameters.wieght: unknown parameter for merge_method 'linear'"),
    ("merge_method: linear\nmodels: [{model: x, parameters: {weight: abc}}]",
     "models.0.parameters.weight: parameter 'weight' must be a number"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: x, parameters: {normalize: true}}]",
     "models.0.parameters.normalize: 'normalize' applies to the whole tensor"),
    ("merge_method: ties\nbase_model: b\nparameters: {normalize: 3}\nmodels: [{model: x}]",
     "parameters.normalize: parameter 'normalize' must be true or false"),
    ("merge_method: linear\nmodels: [{model: x}]\nmodel_name: y", "model_name: unknown key"),
    ("merge_method: linear\nmodels: [{model: x, layer_range: [0, 2]}]",
     "models.0.layer_range: unknown key"),
    ("merge_method: linear", "exactly one of 'models' or 'slices'"),
    ("merge_method: linear\nmodels: [{model: x}]\nslices: [{sources: [{model: x, "
     "layer_range: [0, 1]}]}]", "exactly one of 'models' or 'slices'"),
    ("merge_method: linear\nslices: [{sources: [{model: x, layer_range: [2, 1]}]}]",
     "layer_range must satisfy 0 <= start < end"),
    ("merge_method: linear\nslices: [{sources: [{model: x, layer_range: [0, 1]}, {model: y, "
     "layer_range: [0, 2]}]}]", "same number of layers"),
    ("merge_method: linear\nmodels: [{model: x}]\ndtype: float8", "dtype: Input should be"),
    ("merge_method: linear\nmodels: [{model: x}]\ntokenizer_source: union",
     "tokenizer_source: .*'union' is not supported"),
    ("merge_method: linear\nmodels: [{model: x}]\nchat_template: chatml",
     "chat_template: give the Jinja template text"),
    ("merge_method: linear\nmodels: [{model: x}]\nmask_seed: abc", "mask_seed:"),
    ("merge_method: linear\nmodels: [{model: x, parameters: {weight: [{filter: mlp}]}}]",
     "filter entry has the keys"),
    ("merge_method: linear\nmodels: [{model: x, parameters: {weight: []}}]",
     "models.0.parameters: weight: a parameter value is"),
    ("merge_method: passthrough\nmodels: [{model: x}, {model: y}]", "at most 1 source"),
    ("- a\n- b", "a recipe is a YAML mapping"),
    ("merge_method: [", "not valid YAML"),
])
def test_bad_recipes_name_the_field(text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_yaml(text, "r.yml")


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="cannot read recipe"):
        Recipe.load(tmp_path / "nope.yml")


# --- resolution ----------------------------------------------------------------------------------


def test_layer_t():
    assert [layer_t(i, 5) for i in range(5)] == [0, 0.25, 0.5, 0.75, 1]
    assert layer_t(0, 1) == 1.0


@pytest.mark.parametrize("t,expected", [(0.0, 0.0), (0.5, 0.5), (1 / 3, 0.3), (0.9, 0.91),
                                        (1.0, 1.0)])
def test_gradient_interpolation(t, expected):
    # s = t*(n-1); v = (1-frac) a[floor s] + frac a[floor s + 1]
    assert evaluate_setting([0.0, 0.3, 0.7, 1.0], "x", t) == pytest.approx(expected)


def test_non_numeric_gradient_picks_an_entry():
    assert evaluate_setting([True, False], "x", 0.4) is True
    assert evaluate_setting([True, False], "x", 1.0) is False


def test_filters_first_match_wins_and_no_match_falls_through():
    setting = [{"filter": "mlp", "value": 0.5}, {"filter": "self_attn", "value": [0.0, 1.0]},
               {"filter": None, "value": 0.1}]
    assert evaluate_setting(setting, "model.layers.0.mlp.up_proj.weight", 0.5) == 0.5
    assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.5
    assert evaluate_setting(setting, "model.norm.weight", 0.5) == 0.1
    star = [{"filter": "*", "value": 2.0}]
    assert evaluate_setting(star, "anything", 0.0) == 2.0
    assert evaluate_setting([{"filter": "mlp", "value": 1.0}], "model.norm.weight", 0) is None


def test_precedence_source_over_slice_over_global():
    r = Recipe.from_yaml(MERGEKIT_SLICES)
    s0, s1 = r.slices
    name = "model.layers.0.mlp.up_proj.weight"
    assert resolve_parameter(parameter_scopes(r, s0, 1), "weight", name, 0) == 0.9  # source
    assert resolve_parameter(parameter_scopes(r, s0, 0), "weight", name, 0) == 0.2  # slice
    assert resolve_parameter(parameter_scopes(r, s1, 0), "weight", name, 0) == 0.5  # global
    # a filter list that does not match falls through to the next level
    r2 = Recipe.from_yaml("merge_method: linear\nparameters: {weight: 0.25}\n"
                          "models: [{model: a, parameters: {weight: [{filter: mlp, value: 2}]}}]")
    (s,) = r2.output_slices(4)
    assert resolve_parameter(parameter_scopes(r2, s, 0), "weight", name, 0) == 2
    assert resolve_parameter(parameter_scopes(r2, s, 0), "weight", "model.norm.weight", 0) == 0.25


def test_models_form_normalizes_to_one_slice_with_the_base_appended():
    r = Recipe.from_yaml(MERGEKIT_TIES)
    (s,) = r.output_slices(40)
    assert [src.model for src in s.sources] == [
        "psmathur/orca_mini_v3_13b", "garage-bAInd/Platypus2-13B",
        "WizardLM/WizardMath-13B-V1.0", "TheBloke/Llama-2-13B-fp16"]
    assert all(src.layer_range == (0, 40) for src in s.sources)
    assert s.sources[-1].parameters is None
    assert r.referenced_models()[0] == "TheBloke/Llama-2-13B-fp16"
