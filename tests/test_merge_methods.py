"""Merge methods and sparsifiers against plain computations of the reference formulas."""

from __future__ import annotations

import importlib

import pytest
import torch

from evomerge.methods import sparsify as sp
from evomerge.methods.registry import (
    ParamScope,
    TensorGroup,
    get_method,
    merge_group,
    method_names,
    registered_methods,
)

REQUIRED = "required"

# --- helpers: the reference formulas, written plainly and elementwise ---------------------------


def defaults(method_name: str, **overrides):
    """Shared and per-source parameter dicts with the method's declared defaults."""
    method = get_method(method_name)
    shared = {p.name: p.default for p in method.params if p.scope.value == "shared"}
    shared.update({k: v for k, v in overrides.items() if k in shared})
    return shared


def run(method_name: str, base, xs, weights, densities=None, mask_seed=0, extra=None, **shared):
    tensors = {0: base, **{i + 1: x for i, x in enumerate(xs)}}
    per = {0: {}}
    for i in range(len(xs)):
        per[i + 1] = {"weight": weights[i], "density": 1.0 if densities is None else densities[i],
                      **(extra or {})}
    group = TensorGroup(name="t", tensors=tensors, base=0)
    return merge_group(get_method(method_name), group, defaults(method_name, **shared), per,
                       mask_seed=mask_seed)


def ref_topk_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    flat = delta.flatten().abs().tolist()
    k = max(1, int(density * len(flat)))
    keep = sorted(range(len(flat)), key=lambda j: -flat[j])[:k]
    mask = torch.zeros(len(flat))
    mask[keep] = 1
    return mask.reshape(delta.shape)


def ref_ties(base, xs, ws, density, normalize=True):
    """TIES written per element: trim, elect sign by summed weighted deltas, disjoint mean."""
    deltas = [(x - base) * ref_topk_mask(x - base, density) * w
              for x, w in zip(xs, ws, strict=True)]
    out = base.clone()
    for j in range(base.numel()):
        vals = [d.flatten()[j].item() for d in deltas]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        agree = [i for i, v in enumerate(vals) if v != 0 and (v > 0) == (sign > 0)]
        num = sum(vals[i] for i in agree)
        den = sum(ws[i] for i in agree) if normalize else 1.0
        out.view(-1)[j] += num / (den if den != 0 else 1.0)
    return out


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    xs = [base + torch.randn(6, 5, generator=g) * s for s in (0.5, 1.0, 0.8)]
    return base, xs


# --- methods ------------------------------------------------------------------------------------


def test_registry_lists_methods_and_rejects_unknown():
    for name in ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                 "breadcrumbs_ties", "della", "della_linear"):
        assert name in method_names()
    with pytest.raises(ValueError, match="unknown merge_method 'tie'.*ties"):
        get_method("tie")


# name -> (arXiv id of its paper, parameters with defaults, requires_base, max_sources)
_FAMILY = {"weight": REQUIRED, "density": 1.0, "rescale_mode": "l1", "lambda": 1.0,
           "int8_mask": False}
EXPECTED_METHODS = {
    "linear": ("2203.05482", {"weight": REQUIRED, "normalize": True}, False, None),
    "passthrough": (None, {"scale": None}, False, 1),
    "task_arithmetic": ("2212.04089", {**_FAMILY, "normalize": False, "rescale": False}, True,
                        None),
    "ties": ("2306.01708", {**_FAMILY, "normalize": True, "rescale": False}, True, None),
    "dare_ties": ("2311.03099", {**_FAMILY, "normalize": False, "rescale": True}, True, None),
    "dare_linear": ("2311.03099", {**_FAMILY, "normalize": False, "rescale": True}, True, None),
    "breadcrumbs": ("2312.06795", {**_FAMILY, "normalize": False, "rescale": False,
                                   "gamma": 0.01}, True, None),
    "breadcrumbs_ties": ("2312.06795", {**_FAMILY, "normalize": False, "rescale": False,
                                        "gamma": 0.01}, True, None),
    "della": ("2406.11617", {**_FAMILY, "normalize": True, "rescale": True, "epsilon": 0.15},
              True, None),
    "della_linear": ("2406.11617", {**_FAMILY, "normalize": False, "rescale": True,
                                    "epsilon": 0.15}, True, None),
}
# the whole-tensor methods: (arXiv id or None, parameters, requires_base, max_sources) as
# mergekit 0.1.5 declares them; all their parameters are shared but nuslerp/multislerp's weight
EXPECTED_METHODS.update({
    "slerp": (None, {"t": REQUIRED}, True, 2),
    "nuslerp": (None, {"weight": REQUIRED, "nuslerp_row_wise": False, "nuslerp_flatten": True},
                False, None),
    "multislerp": (None, {"weight": REQUIRED, "normalize_weights": True, "eps": 1e-8}, False,
                   None),
    "karcher": ("2603.04972", {"max_iter": 10, "tol": 1e-5}, False, None),
    "model_stock": ("2403.19522", {"filter_wise": False}, True, None),
    "nearswap": (None, {"t": REQUIRED}, True, 2),
    "arcee_fusion": (None, {}, True, 2),
    "sce": ("2408.07990", {"int8_mask": False, "select_topk": 1.0}, True, None),
    "ram": ("2601.13572", {"epsilon": 1e-5}, True, None),
    "ramplus_tl": ("2601.13572", {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, True, None),
})
# evomerge's own spectral methods: the papers' defaults, a per-model weight (evomerge's) first
EXPECTED_METHODS.update({
    "tsv": ("2412.00081", {"weight": 1.0, "rank_fraction": 1.0, "alpha": 1.0}, True, None),
    "iso_c": ("2502.04959", {"weight": 1.0, "alpha": 1.0}, True, None),
    "iso_cts": ("2502.04959", {"weight": 1.0, "common_space_fraction": 0.8, "alpha": 1.0}, True,
                None),
})
SHARED = {"normalize", "rescale", "rescale_mode", "lambda", "int8_mask", "t", "nuslerp_row_wise",
          "nuslerp_flatten", "normalize_weights", "eps", "max_iter", "tol", "filter_wise",
          "select_topk", "r", "alpha", "rank_fraction", "common_space_fraction"}


def test_every_registered_method_and_its_metadata():
    import evomerge.methods as methods_pkg

    assert method_names() == sorted(EXPECTED_METHODS)
    assert [m.name for m in registered_methods()] == sorted(EXPECTED_METHODS)
    assert methods_pkg.get_method is get_method  # the package exports the registry's API
    for method in registered_methods():
        arxiv, params, requires_base, max_sources = EXPECTED_METHODS[method.name]
        assert get_method(method.name) is method
        module = importlib.import_module(f"evomerge.methods.{method.name}")
        assert module.METHOD is method, "each method is its own module"
        if arxiv is None:  # passthrough: no paper; the others: mergekit's reference link
            assert method.paper is None or (not method.paper.arxiv and
                                            method.paper.url.startswith("https://"))
        else:
            assert method.paper.arxiv == arxiv and method.paper.title
            assert method.paper.url == f"https://arxiv.org/abs/{arxiv}"
        assert {p.name: (REQUIRED if p.required else p.default) for p in method.params} == params
        for p in method.params:
            want = (ParamScope.SHARED if p.name in SHARED or (p.name == "epsilon"
                                                             and method.name.startswith("ram"))
                    else ParamScope.INPUT if method.name in ("linear", "passthrough")
                    else ParamScope.NON_BASE)
            assert p.scope is want, (method.name, p.name)
        assert method.requires_base is requires_base and method.max_sources == max_sources


def test_registry_holds_all_20_mergekit_methods():
    from evomerge.methods.registry import EVOMERGE_ONLY, MERGEKIT_METHODS, MERGEKIT_ONLY

    assert len(MERGEKIT_METHODS) == 20
    assert method_names() == sorted({*MERGEKIT_METHODS, *EVOMERGE_ONLY})
    assert not set(EVOMERGE_ONLY) & set(MERGEKIT_METHODS)
    assert MERGEKIT_ONLY == ()


def test_a_mergekit_method_evomerge_lacked_would_be_named_as_unsupported(monkeypatch):
    """None is missing today; were one dropped, a recipe naming it is told so, not 'unknown'."""
    from evomerge.methods import registry
    from evomerge.recipes.parameter_space import Recipe

    monkeypatch.setattr(registry, "_METHODS",
                        {k: v for k, v in registry._METHODS.items() if k != "slerp"})
    monkeypatch.setattr(registry, "MERGEKIT_ONLY", ("slerp",))
    with pytest.raises(ValueError) as err:
        get_method("slerp")
    message = str(err.value)
    assert "'slerp'" in message and "not supported by evomerge" in message
    assert "unknown" not in message
    assert "supported: " + ", ".join(method_names()) in message
    with pytest.raises(ValueError, match="'slerp' is a mergekit method that is not supported by "
                                         "evomerge; supported: arcee_fusion, breadcrumbs, "):
        Recipe.from_dict({"merge_method": "slerp", "base_model": "a",
                          "models": [{"model": "a"}, {"model": "b"}],
                          "parameters": {"t": 0.5}})


@pytest.mark.parametrize("name,normalize,rescale,extra", [
    ("task_arithmetic", False, False, {}),
    ("ties", True, False, {}),
    ("dare_ties", False, True, {}),
    ("dare_linear", False, True, {}),
    ("breadcrumbs", False, False, {"gamma": 0.01}),
    ("breadcrumbs_ties", False, False, {"gamma": 0.01}),
    ("della", True, True, {"epsilon": 0.15}),
    ("della_linear", False, True, {"epsilon": 0.15}),
])
def test_defaults_match_the_reference_table(name, normalize, rescale, extra):
    m = get_method(name)
    d = {p.name: p.default for p in m.params}
    assert d["normalize"] is normalize and d["rescale"] is rescale
    assert d["lambda"] == 1.0 and d["density"] == 1.0 and d["rescale_mode"] == "l1"
    for k, v in extra.items():
        assert d[k] == v
    assert m.requires_base


def test_linear_normalized_and_not(tensors):
    base, xs = tensors
    group = TensorGroup("t", {0: xs[0], 1: xs[1], 2: base})
    per = {0: {"weight": 0.5}, 1: {"weight": 1.5}, 2: {"weight": 2.0}}
    out = merge_group(get_method("linear"), group, {"normalize": True}, per)
    expected = (0.5 * xs[0] + 1.5 * xs[1] + 2.0 * base) / 4.0
    torch.testing.assert_close(out, expected)
    out = merge_group(get_method("linear"), group, {"normalize": False}, per)
    torch.testing.assert_close(out, 0.5 * xs[0] + 1.5 * xs[1] + 2.0 * base)


def test_linear_accumulates_in_float32_for_bf16():
    a = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    b = torch.tensor([3.0, 5.0], dtype=torch.bfloat16)
    group = TensorGroup("t", {0: a, 1: b})
    out = merge_group(get_method("linear"), group, {"normalize": True},
                      {0: {"weight": 1 / 3}, 1: {"weight": 2 / 3}})
    expected = ((a.float() * (1 / 3) + b.float() * (2 / 3)) / 1.0).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_task_arithmetic_and_lambda(tensors):
    base, xs = tensors
    out = run("task_arithmetic", base, xs, [0.3, 0.5, -0.2])
    expected = base + sum(w * (x - base) for w, x in zip([0.3, 0.5, -0.2], xs, strict=True))
    torch.testing.assert_close(out, expected)
    out = run("task_arithmetic", base, xs, [0.3, 0.5, 0.2], normalize=True, **{"lambda": 0.5})
    expected = base + 0.5 * sum(w * (x - base) for w, x in zip([0.3, 0.5, 0.2], xs,
                                                                strict=True)) / 1.0
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2, 1e-6])
def test_ties_against_elementwise_reference(tensors, density):
    base, xs = tensors
    ws = [1.0, 0.6, 0.9]
    out = run("ties", base, xs, ws, [density] * 3)
    torch.testing.assert_close(out, ref_ties(base, xs, ws, density))


def test_ties_sign_election_by_summed_weighted_deltas():
    base = torch.zeros(3)
    xs = [torch.tensor([1.0, -1.0, 2.0]), torch.tensor([-3.0, -1.0, -1.0]),
          torch.tensor([1.0, 4.0, -0.5])]
    out = run("ties", base, xs, [1.0, 1.0, 1.0])
    # element 0: sum -1 -> negative wins: only -3 (weight 1) -> -3
    # element 1: sum 2 -> positive: only 4 -> 4 ; element 2: sum 0.5 -> positive: only 2 -> 2
    torch.testing.assert_close(out, torch.tensor([-3.0, 4.0, 2.0]))


def test_ties_density_zero_gives_base(tensors):
    base, xs = tensors
    torch.testing.assert_close(run("ties", base, xs, [1.0] * 3, [0.0] * 3), base)


def test_ties_tiny_density_keeps_one_element():
    delta = torch.tensor([[0.1, -5.0], [0.3, 0.2]])
    out = sp.magnitude(delta, 1e-9)
    assert torch.equal(out, torch.tensor([[0.0, -5.0], [0.0, 0.0]]))
    assert torch.equal(sp.magnitude(delta, 0.0), torch.zeros(2, 2))
    assert torch.equal(sp.magnitude(delta, 1.0), delta)
    assert torch.equal(sp.magnitude(delta, 0.5), torch.tensor([[0.0, -5.0], [0.3, 0.0]]))


def test_magnitude_rescale_l1_and_inverse_density():
    delta = torch.tensor([4.0, -1.0, 2.0, 0.5])
    kept = torch.tensor([4.0, 0.0, 2.0, 0.0])
    torch.testing.assert_close(sp.magnitude(delta, 0.5, sp.RescaleMode.L1), kept * 7.5 / 6.0)
    torch.testing.assert_close(sp.magnitude(delta, 0.5, sp.RescaleMode.INVERSE_DENSITY),
                               kept / 0.5)


def test_breadcrumbs_drops_outliers_and_small():
    delta = torch.arange(1.0, 101.0)  # |delta| sorted ascending already
    out = sp.magnitude_outliers(delta, density=0.9, gamma=0.05)
    # N=100: target 90, n_top 5, n_bot 5 -> keep values 6..95
    expected = torch.where((delta >= 6) & (delta <= 95), delta, 0.0)
    assert torch.equal(out, expected)
    # target + n_top > N: the outlier removal shrinks to keep the target
    out = sp.magnitude_outliers(delta, density=0.98, gamma=0.05)
    assert torch.equal(out, torch.where(delta <= 98, delta, 0.0))
    assert torch.equal(sp.magnitude_outliers(delta, 0.0, 0.05), torch.zeros(100))
    assert torch.equal(sp.magnitude_outliers(delta, 1.0, 0.05), delta)


@pytest.mark.parametrize("rescale", [None, *sp.RescaleMode])
def test_breadcrumbs_density_zero_is_zeros_whatever_the_rescale(rescale):
    delta = torch.randn(7, 9, generator=torch.Generator().manual_seed(8))
    assert torch.equal(sp.magnitude_outliers(delta, 0.0, 0.05, rescale), torch.zeros(7, 9))
    assert torch.equal(sp.magnitude_outliers(delta, -0.1, 0.0, rescale), torch.zeros(7, 9))


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("rescale_mode", ["l1", "inverse_density"])
def test_breadcrumbs_methods_at_density_zero_give_the_base(tensors, name, rescale_mode):
    base, xs = tensors
    out = run(name, base, xs, [1.0, 0.5, 0.7], [0.0] * 3, extra={"gamma": 0.05},
              rescale=True, rescale_mode=rescale_mode)
    assert torch.equal(out, base)


def test_breadcrumbs_ties_method(tensors):
    base, xs = tensors
    ws, d, gamma = [1.0, 0.5, 0.7], 0.6, 0.1
    out = run("breadcrumbs_ties", base, xs, ws, [d] * 3, extra={"gamma": gamma})
    deltas = [sp.magnitude_outliers(x - base, d, gamma) * w for x, w in zip(xs, ws, strict=True)]
    total = sum(deltas)
    sign = torch.where(total >= 0, 1.0, -1.0)
    masks = [(dd.sign() == sign).float() for dd in deltas]
    mixed = sum(m * dd for m, dd in zip(masks, deltas, strict=True))
    torch.testing.assert_close(out, base + mixed)  # normalize defaults to false


# --- random masks: DARE and DELLA ---------------------------------------------------------------


def test_uniforms_match_the_pure_python_definition():
    u = sp.uniforms(7, "model.layers.0.mlp.up_proj.weight", (5, 40))
    ref = torch.tensor(sp.uniforms_reference(7, "model.layers.0.mlp.up_proj.weight", 200),
                       dtype=torch.float64).reshape(5, 40)
    assert torch.equal(u, ref)
    assert 0.0 <= u.min() and u.max() < 1.0


def test_dare_mask_is_keyed_by_seed_and_name_only():
    delta = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    a = sp.random(delta, 0.5, mask_seed=3, mask_key="0:x")
    torch.randn(1000)  # touching the global generator changes nothing
    b = sp.random(delta, 0.5, mask_seed=3, mask_key="0:x")
    assert torch.equal(a, b)
    assert not torch.equal(a, sp.random(delta, 0.5, mask_seed=4, mask_key="0:x"))
    assert not torch.equal(a, sp.random(delta, 0.5, mask_seed=3, mask_key="0:y"))
    kept = (a != 0).float().mean().item()
    assert 0.4 < kept < 0.6


def test_dare_higher_density_keeps_a_superset():
    delta = torch.randn(50, 50, generator=torch.Generator().manual_seed(2))
    low = sp.random(delta, 0.3, mask_seed=0, mask_key="k") != 0
    high = sp.random(delta, 0.7, mask_seed=0, mask_key="k") != 0
    assert torch.all(high | ~low) and high.sum() > low.sum()


def test_dare_rescale_modes_and_edges():
    delta = torch.randn(40, 10, generator=torch.Generator().manual_seed(3))
    masked = sp.random(delta, 0.5, mask_seed=1, mask_key="k")
    mask = (masked != 0).float()
    l1 = sp.random(delta, 0.5, mask_seed=1, mask_key="k", rescale=sp.RescaleMode.L1)
    torch.testing.assert_close(l1, delta * mask * delta.abs().sum() / (delta * mask).abs().sum())
    inv = sp.random(delta, 0.5, mask_seed=1, mask_key="k",
                    rescale=sp.RescaleMode.INVERSE_DENSITY)
    torch.testing.assert_close(inv, delta * mask / 0.5)
    assert torch.equal(sp.random(delta, 1.0, mask_seed=1, mask_key="k"), delta)
    assert torch.equal(sp.random(delta, 0.0, mask_seed=1, mask_key="k"), torch.zeros_like(delta))


def _group(name, base, xs, order):
    """A group whose mapping is filled in `order` (keys are the sources' recipe positions)."""
    tensors = {0: base, **{i + 1: x for i, x in enumerate(xs)}}
    return TensorGroup(name=name, tensors={k: tensors[k] for k in order}, base=0)


ORDER_METHODS = {"linear": {}, "task_arithmetic": {}, "ties": {"density": 0.5},
                 "dare_ties": {"density": 0.5}, "dare_linear": {"density": 0.3},
                 "breadcrumbs": {"density": 0.6, "gamma": 0.1},
                 "della": {"density": 0.5, "epsilon": 0.1}}


@pytest.mark.parametrize("name", sorted(ORDER_METHODS))
def test_method_is_independent_of_tensor_and_input_order(name):
    """Reordering the tensors merged, and the order in which a group's inputs arrive, changes
    nothing (masks are keyed by mask seed, source key and tensor name, never by position)."""
    g = torch.Generator().manual_seed(5)
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight",
             "model.norm.weight"]
    shapes = [(16, 8), (8, 8), (8,)]
    groups = {}
    for n, shape in zip(names, shapes, strict=True):
        base = torch.randn(shape, generator=g)
        groups[n] = (base, [base + torch.randn(shape, generator=g) * s for s in (0.5, 1.0, 0.8)])
    method = get_method(name)
    shared = defaults(name)
    weights = [1.0, 0.5, 0.7]
    per = {0: {"weight": 0.3}} | {i + 1: {"weight": w, **ORDER_METHODS[name]}
                                   for i, w in enumerate(weights)}

    def merge_all(tensor_order, input_order):
        return {n: merge_group(method, _group(n, *groups[n], input_order), shared, per,
                               mask_seed=11) for n in tensor_order}

    reference = merge_all(names, [0, 1, 2, 3])
    for tensor_order, input_order in [(names[::-1], [0, 1, 2, 3]),
                                      ([names[1], names[2], names[0]], [3, 1, 0, 2]),
                                      (names, [2, 3, 0, 1])]:
        again = merge_all(tensor_order, input_order)
        assert list(again) == tensor_order  # the merges really ran in the new order
        for n in names:
            assert torch.equal(again[n], reference[n]), (n, tensor_order, input_order)
    # The mask seed does reach the random sparsifiers.
    if name in ("dare_ties", "dare_linear", "della"):
        other = merge_group(method, _group(names[0], *groups[names[0]], [0, 1, 2, 3]), shared,
                            per, mask_seed=12)
        assert not torch.equal(other, reference[names[0]])


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "breadcrumbs"])
def test_deterministic_methods_do_not_depend_on_source_order(name):
    """Without random masks, listing the sources in another order merges the same model (up to
    the rounding of a sum taken in another order)."""
    g = torch.Generator().manual_seed(6)
    base = torch.randn(12, 6, generator=g)
    xs = [base + torch.randn(12, 6, generator=g) * s for s in (0.5, 1.0, 0.8)]
    weights = [1.0, 0.5, 0.7]
    params = ORDER_METHODS[name]
    method = get_method(name)

    def merge(perm):
        tensors = {0: base, **{i + 1: xs[j] for i, j in enumerate(perm)}}
        per = {0: {"weight": 0.3}} | {i + 1: {"weight": weights[j], **params}
                                       for i, j in enumerate(perm)}
        return merge_group(method, TensorGroup("t", tensors, base=0), defaults(name), per)

    reference = merge([0, 1, 2])
    for perm in ([2, 0, 1], [1, 2, 0], [2, 1, 0]):
        torch.testing.assert_close(merge(perm), reference, rtol=1e-6, atol=1e-6)


def test_dare_linear_against_formula(tensors):
    base, xs = tensors
    ws, d = [0.4, 0.6, 1.0], 0.6
    out = run("dare_linear", base, xs, ws, [d] * 3, mask_seed=5)
    expected = base.clone()
    for i, (x, w) in enumerate(zip(xs, ws, strict=True)):
        delta = x - base
        mask = (sp.uniforms(5, f"{i + 1}:t", delta.shape) < d).float()
        kept = delta * mask
        expected += w * kept * delta.abs().sum() / kept.abs().sum()
    torch.testing.assert_close(out, expected)


def test_della_probabilities_and_mask():
    delta = torch.tensor([[0.1, -0.4, 0.3], [2.0, 1.0, -3.0]])
    p = sp.della_probabilities(delta, 0.5, 0.2)
    # ranks per row: [0, 2, 1] and [1, 0, 2] -> p = 0.3 + 0.4 * rank / 2
    expected = torch.tensor([[0.3, 0.7, 0.5], [0.5, 0.3, 0.7]], dtype=torch.float64)
    torch.testing.assert_close(p, expected)
    out = sp.della_magprune(delta, 0.5, 0.2, mask_seed=0, mask_key="k")
    mask = sp.uniforms(0, "k", delta.shape) < expected
    torch.testing.assert_close(out, delta * mask)
    with pytest.raises(ValueError, match="density \\+/- epsilon"):
        sp.della_magprune(delta, 0.1, 0.15, mask_seed=0, mask_key="k")


def test_della_method_normalizes_with_consensus(tensors):
    base, xs = tensors
    ws, d, eps = [1.0, 0.5, 0.8], 0.5, 0.1
    out = run("della", base, xs, ws, [d] * 3, extra={"epsilon": eps}, mask_seed=2)
    deltas = []
    for i, (x, w) in enumerate(zip(xs, ws, strict=True)):
        kept = sp.della_magprune(x - base, d, eps, mask_seed=2, mask_key=f"{i + 1}:t",
                                 rescale=sp.RescaleMode.L1)
        deltas.append(kept * w)
    sign = torch.where(sum(deltas) >= 0, 1.0, -1.0)
    masks = [(dd.sign() == sign).float() for dd in deltas]
    num = sum(m * dd for m, dd in zip(masks, deltas, strict=True))
    den = sum(m * w for m, w in zip(masks, ws, strict=True))
    den = torch.where(den == 0, 1.0, den)
    torch.testing.assert_close(out, base + num / den)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masks_are_the_same_on_gpu():
    delta = torch.randn(128, 64, generator=torch.Generator().manual_seed(4))
    cpu = sp.random(delta, 0.4, mask_seed=9, mask_key="k", rescale=sp.RescaleMode.L1)
    gpu = sp.random(delta.cuda(), 0.4, mask_seed=9, mask_key="k", rescale=sp.RescaleMode.L1)
    assert torch.equal(cpu != 0, gpu.cpu() != 0)
    assert torch.equal(sp.uniforms(1, "x", (1000,)), sp.uniforms(1, "x", (1000,), "cuda").cpu())
    cpu = sp.della_magprune(delta, 0.4, 0.1, mask_seed=9, mask_key="k")
    gpu = sp.della_magprune(delta.cuda(), 0.4, 0.1, mask_seed=9, mask_key="k")
    assert torch.equal(cpu != 0, gpu.cpu() != 0)
