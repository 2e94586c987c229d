"""The in-place merger over LoRA adapters: task_arithmetic / linear kept low-rank (no dense
delta), equal to the engine (and so to merge_and_unload + the same method) within float32
rounding; other methods take the dense path, bit for bit as the engine; the memory plan counts
the adapters' factors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_helpers import make_adapter
from merge_helpers import model_family

from evomerge.merge.engine import merge_state_dict
from evomerge.merge.inplace import InPlaceMerger, plan
from evomerge.recipes.parameter_space import Recipe

ATOL = 1e-6  # float32: s*B@A formed directly vs (base + s*B@A) - base in the engine


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora_inplace")
    base, _ = model_family(root, "llama", n=1)
    out = {"base": base}
    out["a1"] = make_adapter(base, root / "a1", seed=1)
    out["a2"] = make_adapter(base, root / "a2", seed=2, rank=2, targets=("q_proj", "up_proj"))
    return out


def _recipe(method, family, weights, **shared) -> Recipe:
    data = {"merge_method": method, "dtype": "float32", "parameters": shared,
            "models": [{"model": str(family[k]), "parameters": {"weight": w}}
                       for k, w in zip(("a1", "a2"), weights, strict=True)]}
    if method != "linear":
        data["base_model"] = str(family["base"])
    return Recipe.from_dict(data)


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_low_rank_path_equals_the_engine(family, method, monkeypatch):
    from evomerge.models.sources import AdapterSource

    base = None if method == "linear" else str(family["base"])
    models = [str(family["a1"]), str(family["a2"])]

    def no_dense(*args, **kwargs):
        raise AssertionError("the low-rank path read a dense adapter tensor")

    with monkeypatch.context() as m:
        m.setattr(AdapterSource, "read", no_dense)
        merger = InPlaceMerger(models, base, method)
    assert merger._lowrank and not merger._entries  # no dense rows held
    for weights, shared in (([0.7, 0.4], {}), ([[0.1, 1.2], -0.3], {"normalize": True}),
                            ([1.0, 0.5], {"lambda": 0.8})):
        if method == "linear":
            shared.pop("lambda", None)
        recipe = _recipe(method, family, weights, **shared)
        with monkeypatch.context() as m:
            m.setattr(AdapterSource, "read", no_dense)
            got = merger.build(recipe).state_dict()
        want = merge_state_dict(recipe)
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, atol=ATOL, rtol=0)


def test_dense_methods_over_adapters_equal_the_engine(family):
    models = [str(family["a1"]), str(family["a2"])]
    merger = InPlaceMerger(models, str(family["base"]), "ties")
    assert not merger._lowrank
    recipe = _recipe("ties", family, [0.9, 0.6], density=0.5)
    recipe = Recipe.from_dict({**recipe.model_dump(exclude_none=True),
                               "models": [{"model": m, "parameters": {"weight": 0.9,
                                                                      "density": 0.5}}
                                          for m in models]})
    got = merger.build(recipe).state_dict()
    for k, v in merge_state_dict(recipe).items():
        assert torch.equal(got[k], v), k


def test_memory_plan_counts_adapter_factors(family):
    models = [str(family["a1"]), str(family["a2"])]
    low = plan(models, str(family["base"]), "task_arithmetic")
    dense = plan(models, str(family["base"]), "ties")
    assert "adapters" in low.parts and "inputs" not in low.parts
    assert low.parts["adapters"][1] < dense.parts["inputs"][1]
    merger = InPlaceMerger(models, str(family["base"]), "task_arithmetic")
    held = sum(t.numel() * t.element_size() for e in merger._lowrank_entries.values()
               for t in (*e.scaled_b.values(), e.a_cat, e.b_cat) if t is not None)
    assert low.parts["adapters"][1] == held


def test_lorahub_composes_factors_in_engine_and_in_place(family, tmp_path):
    """LoraHub: base + (sum w_i s_i B_i) @ (sum w_i A_i), from the factors, in both builders;
    refused over a full model and over adapters of different ranks."""
    from lora_helpers import make_adapter

    from evomerge.models.sources import MergeError, load_source

    a3 = make_adapter(family["base"], tmp_path / "a3", seed=5)  # a1's rank and modules
    models = [str(family["a1"]), str(a3)]
    recipe = Recipe.from_dict({
        "merge_method": "lorahub", "base_model": str(family["base"]), "dtype": "float32",
        "models": [{"model": m, "parameters": {"weight": w}}
                   for m, w in zip(models, (0.6, -0.3), strict=True)]})
    got = merge_state_dict(recipe)
    s1, s3 = load_source(models[0]), load_source(models[1])
    base = s1.base_source
    from contextlib import ExitStack

    with ExitStack() as stack:
        for name, f1 in ((n, s1.lora(n)) for n in s1.adapter.modules):
            f3 = s3.lora(name)
            want = base.read(name, stack) + (0.6 * f1.scaling * f1.b - 0.3 * f3.scaling * f3.b) @ (
                0.6 * f1.a - 0.3 * f3.a)
            torch.testing.assert_close(got[name], want, atol=ATOL, rtol=0)
            ta = merge_state_dict(Recipe.from_dict({**recipe.model_dump(exclude_none=True),
                                                    "merge_method": "task_arithmetic"}))
            assert not torch.allclose(ta[name], got[name])  # a different composition
            break
    merger = InPlaceMerger(models, str(family["base"]), "lorahub")
    assert merger._lowrank
    built = merger.build(recipe).state_dict()
    for k, v in got.items():
        torch.testing.assert_close(built[k], v, atol=ATOL, rtol=0)
    mixed = Recipe.from_dict({**recipe.model_dump(exclude_none=True), "models": [
        {"model": str(family["a1"]), "parameters": {"weight": 1.0}},
        {"model": str(family["a2"]), "parameters": {"weight": 1.0}}]})
    with pytest.raises(MergeError, match="lorahub: (only some adapters|the adapters of)"):
        merge_state_dict(mixed)
