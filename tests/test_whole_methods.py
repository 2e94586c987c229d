"""The whole-tensor methods (slerp ... ramplus_tl) against plain formulas and their edge cases,
and `evomerge merge` on a recipe of each of mergekit 0.1.5's 20 methods."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from merge_helpers import load_folder, model_family
from whole_recipes import WHOLE, whole_recipe

from evomerge.cli.main import main
from evomerge.methods.registry import EVOMERGE_ONLY, MERGEKIT_METHODS, TensorGroup, get_method
from evomerge.recipes.parameter_space import Recipe


def merge(name: str, tensors: list[torch.Tensor], base: int | None = 0, weights=None,
          **shared) -> torch.Tensor:
    """One tensor merged by `name` with its defaults; `weights`: the non-base sources'."""
    method = get_method(name)
    values = {p.name: p.default for p in method.params if p.scope.value == "shared"}
    values.update(shared)
    others = [k for k in range(len(tensors)) if k != base]
    per = {k: {} for k in range(len(tensors))}
    if weights is not None:
        per.update({k: {"weight": w} for k, w in zip(others, weights, strict=True)})
    group = TensorGroup("t", dict(enumerate(tensors)), base=base)
    return method.merge(group, values, per, mask_seed=0)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def slerp_formula(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = float(a64 @ b64 / (a64.norm() * b64.norm()))
    theta = math.acos(cos)
    return ((math.sin((1 - t) * theta) * a64 + math.sin(t * theta) * b64)
            / math.sin(theta)).reshape(a.shape)


def test_slerp_interpolates_on_the_sphere_and_linearly_when_collinear():
    a, b = rand(6, 5), rand(6, 5, seed=1)
    for t in (0.0, 0.3, 1.0):
        torch.testing.assert_close(merge("slerp", [a, b], t=t).double(),
                                   slerp_formula(t, a, b), rtol=1e-5, atol=1e-6)
    # the base is the t = 0 end wherever the recipe lists it
    torch.testing.assert_close(merge("slerp", [b, a], base=1, t=0.0), a, rtol=1e-6, atol=1e-6)
    collinear = merge("slerp", [a, 2 * a], t=0.25)
    assert torch.equal(collinear, (0.75 * a + 0.25 * (2 * a)))


def test_slerp_and_nearswap_take_the_base_and_exactly_one_other_model():
    for name in ("slerp", "nearswap", "arcee_fusion"):
        params = {} if name == "arcee_fusion" else {"parameters": {"t": 0.5}}
        with pytest.raises(ValueError, match=f"{name} takes at most 2 source"):
            Recipe.from_dict({"merge_method": name, "base_model": "a",
                              "models": [{"model": "b"}, {"model": "c"}], **params})
        with pytest.raises(ValueError, match=f"slices.0: {name} takes exactly 2 sources per "
                                             "slice; got 1"):
            Recipe.from_dict({"merge_method": name, "base_model": "a", **params, "slices": [
                {"sources": [{"model": "a", "layer_range": [0, 2]}]}]})
        with pytest.raises(ValueError, match="needs a base_model"):
            Recipe.from_dict({"merge_method": name, "models": [{"model": "b"}, {"model": "c"}],
                              **params})


def test_nuslerp_t_from_the_weights_and_slerp_of_task_vectors_with_a_base():
    base, a, b = rand(4, 8), rand(4, 8, seed=1), rand(4, 8, seed=2)
    # t = w_b / (w_a + w_b); flattened (the default): slerp of the whole tensors
    got = merge("nuslerp", [a, b], base=None, weights=[1.0, 3.0])
    torch.testing.assert_close(got.double(), slerp_formula(0.75, a, b), rtol=1e-5, atol=1e-6)
    got = merge("nuslerp", [base, a, b], base=0, weights=[2.0, 2.0])
    want = base.double() + slerp_formula(0.5, a - base, b - base)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # not flattened: each row on its own; row-wise: each column
    rows = merge("nuslerp", [a, b], base=None, weights=[1.0, 1.0], nuslerp_flatten=False)
    torch.testing.assert_close(rows[2].double(), slerp_formula(0.5, a[2], b[2]), rtol=1e-5,
                               atol=1e-6)
    cols = merge("nuslerp", [a, b], base=None, weights=[1.0, 1.0], nuslerp_flatten=False,
                 nuslerp_row_wise=True)
    torch.testing.assert_close(cols[:, 3].double(), slerp_formula(0.5, a[:, 3], b[:, 3]),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="nuslerp takes exactly 2 sources besides the base"):
        merge("nuslerp", [base, a, b, a + b], weights=[1.0, 1.0, 1.0])


def test_multislerp_of_two_is_slerp_scaled_by_the_mean_norm_and_antipodes_are_refused():
    a, b = rand(5, 5), rand(5, 5, seed=1)
    assert torch.equal(merge("multislerp", [a], base=None, weights=[0.3]), a)
    got = merge("multislerp", [a, b], base=None, weights=[1.0, 1.0])
    # equal weights: the mean direction of the two, at the mean of their norms
    direction = a / a.norm() + b / b.norm()
    want = direction / direction.norm() * (a.norm() + b.norm()) / 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="weighted sum of the unit inputs is zero"):
        merge("multislerp", [a, -a, a, -a], base=None, weights=[1.0] * 4)


def test_karcher_mean_of_two_directions_and_its_base_is_one_of_the_inputs():
    a, b = rand(7, 3), rand(7, 3, seed=1)
    got = merge("karcher", [a, b], base=None)
    direction = a / a.norm() + b / b.norm()
    want = direction / direction.norm() * (a.norm() + b.norm()) / 2  # two points: the midpoint
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the base is ignored as a base: it is merged as one more input
    assert torch.equal(merge("karcher", [a, b], base=0), got)
    assert torch.equal(merge("karcher", [a * 0, b * 0], base=None), a * 0)


def test_model_stock_ratio_from_the_angle_of_the_task_vectors():
    base, d = rand(3, 4), rand(3, 4, seed=1)
    same = merge("model_stock", [base, base + d, base + d])  # cos 1: t = 1, the average
    torch.testing.assert_close(same, base + d, rtol=1e-6, atol=1e-6)
    # cos 0 (orthogonal task vectors): t = 0, the base
    e = torch.zeros(3, 4)
    e[0, 0], d = 1.0, torch.zeros(3, 4)
    d[1, 1] = 1.0
    assert torch.equal(merge("model_stock", [base, base + d, base + e]), base)
    # filter_wise: one ratio per row (row 0 agrees, row 1 is orthogonal)
    x, y = base.clone(), base.clone()
    x[0] += 1.0
    y[0] += 1.0
    x[1, 0] += 1.0
    y[1, 1] += 1.0
    got = merge("model_stock", [base, x, y], filter_wise=True)
    torch.testing.assert_close(got[0], x[0])
    torch.testing.assert_close(got[1], base[1])
    with pytest.raises(ValueError, match="model_stock takes at least 3 sources"):
        merge("model_stock", [base, x])


def test_nearswap_arcee_fusion_sce_and_ram_against_plain_formulas():
    base, a, b = rand(6, 8), rand(6, 8, seed=1), rand(6, 8, seed=2)
    w = (0.3 / (base - a).abs().clamp(min=1e-6)).clamp(0, 1)
    assert torch.equal(merge("nearswap", [base, a], t=0.3), w * a + (1 - w) * base)

    fused = merge("arcee_fusion", [base, a])
    p, q = torch.softmax(a, -1) + 1e-8, torch.softmax(base, -1) + 1e-8
    score = (a - base).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    s = score.flatten().sort().values
    q1, med, q3 = (s[int(f * (s.numel() - 1))] for f in (0.25, 0.5, 0.75))
    keep = score >= med + 1.5 * (q3 - q1)
    assert 0 < int(keep.sum()) < keep.numel()
    assert torch.equal(fused, torch.where(keep, base + (a - base), base))

    tvs = torch.stack([a - base, b - base])
    weights = tvs.square().mean(dim=(1, 2))
    weights = weights / weights.sum()
    agree = tvs.sign() == torch.where(tvs.sum(0) >= 0, 1.0, -1.0)
    ew = weights[:, None, None] * agree
    want = base + (tvs * ew).sum(0) / ew.sum(0).clamp(min=1e-6)
    torch.testing.assert_close(merge("sce", [base, a, b]), want)
    # select_topk keeps the elements of largest variance across the task vectors
    top = merge("sce", [base, a, b], select_topk=0.25)
    var = tvs.var(dim=0, unbiased=False).flatten()
    kept = (top - base).flatten() != 0
    assert int(kept.sum()) == int(0.25 * 48)
    assert var[kept].min() >= var[~kept].max()

    sparse_a = base + (a - base) * (torch.arange(48).reshape(6, 8) % 2 == 0)
    sparse_b = base + (b - base) * (torch.arange(48).reshape(6, 8) % 3 == 0)
    da, db = sparse_a - base, sparse_b - base
    both = (da != 0) & (db != 0)
    want = base + torch.where(both, (da + db) / 2, da + db)
    torch.testing.assert_close(merge("ram", [base, sparse_a, sparse_b]), want)
    plus = merge("ramplus_tl", [base, sparse_a, sparse_b], r=0.5, alpha=0.2)
    rho_a = float(both.sum() / ((da != 0) & ~both).sum())  # shared / unique of model a
    lam_a = 1 + 0.5 * min(rho_a, 0.2)
    only_a = (da != 0) & ~both
    torch.testing.assert_close(plus[only_a], (base + lam_a * da)[only_a])
    torch.testing.assert_close(plus[both], want[both])


def test_integer_parameters_take_integers_only():
    recipe = {"merge_method": "karcher", "models": [{"model": "a"}, {"model": "b"}]}
    assert Recipe.from_dict({**recipe, "parameters": {"max_iter": 3.0}})
    with pytest.raises(ValueError, match="'max_iter' must be an integer, got 2.5"):
        Recipe.from_dict({**recipe, "parameters": {"max_iter": 2.5}})


# --- evomerge merge: every method of mergekit 0.1.5 --------------------------------------------

TASK_ARITHMETIC = {"linear": {"weight": 0.5}, "task_arithmetic": {"weight": 0.5},
                   "ties": {"weight": 0.5, "density": 0.5},
                   "dare_ties": {"weight": 0.5, "density": 0.5},
                   "dare_linear": {"weight": 0.5, "density": 0.5},
                   "breadcrumbs": {"weight": 0.5, "density": 0.5},
                   "breadcrumbs_ties": {"weight": 0.5, "density": 0.5},
                   "della": {"weight": 0.5, "density": 0.5, "epsilon": 0.1},
                   "della_linear": {"weight": 0.5, "density": 0.5, "epsilon": 0.1}}


def test_evomerge_merge_accepts_a_recipe_of_each_mergekit_method(tmp_path):
    fam = [str(p) for p in model_family(tmp_path, "llama", n=3, layers=2, hidden=16)]
    assert sorted({*TASK_ARITHMETIC, *WHOLE}) == sorted({*MERGEKIT_METHODS, *EVOMERGE_ONLY})
    built = {}
    for method in (*MERGEKIT_METHODS, *EVOMERGE_ONLY):
        if method in WHOLE:
            data = whole_recipe(method, fam)
        else:
            data = {"merge_method": method, "base_model": fam[0], "dtype": "float32",
                    "models": [{"model": m} for m in fam[1:]],
                    "parameters": TASK_ARITHMETIC[method]}
        path = tmp_path / f"{method}.yaml"
        path.write_text(yaml.safe_dump(data))
        assert main(["merge", str(path), str(tmp_path / f"out_{method}")]) == 0, method
        state = load_folder(tmp_path / f"out_{method}")
        assert all(torch.isfinite(v).all() for v in state.values())
        built[method] = state["model.layers.0.self_attn.q_proj.weight"]
    base = load_folder(fam[0])["model.layers.0.self_attn.q_proj.weight"]
    assert all(not torch.equal(t, base) for m, t in built.items() if m != "passthrough")


@pytest.mark.parametrize("method", sorted(WHOLE))
def test_mergekit_export_keeps_the_recipe_with_mergekit_names(method):
    from evomerge.recipes.mergekit import mergekit_yaml

    fam = ["/m/base", "/m/ft1", "/m/ft2", "/m/ft3"]
    for slices in (False, True):
        recipe = Recipe.from_dict(whole_recipe(method, fam, slices=slices))
        exported = yaml.safe_load(mergekit_yaml(recipe))
        assert "mask_seed" not in exported and exported["merge_method"] == method
        assert Recipe.from_dict(exported).canonical_json() == recipe.canonical_json()
        names = {p.name for p in get_method(method).params}
        used = set(exported.get("parameters", {}))
        for s in exported.get("slices", []):
            used |= set(s.get("parameters", {}))
            for src in s["sources"]:
                used |= set(src.get("parameters", {}))
        assert used <= names
