"""evomerge against mergekit 0.1.5's own outputs (golden files), without mergekit installed.

tests/golden/ holds a tiny fixture family (scripts/make_parity_family.py) whose deltas tie exactly
at sparsifier density cuts, the recipes (recipes.yaml) and what mergekit 0.1.5 built from them on
CPU (scripts/make_mergekit_golden.py): every output tensor's sha256 and a few tensors in full.

- kind "exact" (every deterministic method): evomerge's engine must give the same tensor names,
  dtypes, shapes and bytes (sha256) as mergekit, and the in-place merger the same up to the sign
  of zeros (torch.equal: its row sums may give -0.0 where torch's sum gives +0.0); where a stored
  sample differs, the test says how many elements and by how much.
- kind "distribution" (dare_ties, dare_linear, della, della_linear: mergekit draws their masks
  from torch's generator, evomerge from its own counter-based uniforms, so no bits can match):
  one-source recipes, so each tensor's mask is visible in the output; per tensor with at least
  MIN_STAT_ELEMENTS non-zero delta elements, the kept share must agree within 5 binomial standard
  deviations of a difference of two draws, 5 * sqrt(2 p (1 - p) / n) (p mergekit's kept share,
  n the non-zero delta elements), and the rescale factor (L1) within a relative
  6 * sqrt(2 (1 - p) / (p n)); over all such tensors together, the kept share within
  5 * sqrt(2 p (1 - p) / N) and, for della, the gap between the kept shares of large and small
  magnitudes (kept_high - kept_low) within 5 * sqrt(2 (p_h q_h + p_l q_l) / (N / 2)).
  The in-place merger must equal the engine there (torch.equal).

A method that evomerge does not register yet fails strictly as an expected failure (xfail,
strict), so that the test runs for real once the method lands. The sort that decides ties is
torch's CPU sort of torch 2.13 (constraints.txt): the goldens are CPU results of that build, with
its AVX2 kernels (tests/cpu_kernels.py: on an AVX-512 machine the default kernels round karcher,
nuslerp and arcee_fusion differently, mergekit's own results included; conftest pins AVX2).
"""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch
from cpu_kernels import CAPABILITY, X86_64
from mergekit_golden import (
    FAMILY,
    GOLDEN,
    PLACEHOLDER,
    base_and_source,
    equal_sha256,
    load_folder,
    load_manifest,
    load_recipes,
    mask_stats,
    resolve,
    tensor_sha256,
)

from evomerge.merge.engine import merge_state_dict
from evomerge.merge.inplace import InPlaceMerger
from evomerge.merge.inplace.memory import check_supported
from evomerge.methods.registry import get_method, method_names
from evomerge.recipes.parameter_space import Recipe

RECIPES = load_recipes()
MANIFEST = load_manifest()
# The in-place merger builds recipes with the sources' own layer structure: layer stacking is
# out of its scope (it needs no candidates-in-place speed anyway).
NOT_IN_PLACE = {"passthrough_slices": "layer stacking changes the layer structure"}


def registered(method: str) -> bool:
    return method in method_names()


def in_place_supported(method: str) -> bool:
    if not registered(method):
        return False
    try:
        check_supported(get_method(method))
    except ValueError:
        return False
    return True


def cases(kind: str, *, in_place: bool = False) -> list:
    out = []
    for name, spec in RECIPES.items():
        if spec["kind"] != kind or (in_place and name in NOT_IN_PLACE):
            continue
        method = spec["recipe"]["merge_method"]
        ok = in_place_supported(method) if in_place else registered(method)
        why = ("method not yet in the in-place merger" if in_place and registered(method)
               else "method not yet in evomerge")
        marks = () if ok else (pytest.mark.xfail(strict=True, reason=why),)
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def recipe(name: str) -> Recipe:
    return Recipe.from_dict(resolve(RECIPES[name]["recipe"]), f"golden recipe {name}")


@cache
def engine(name: str) -> dict[str, torch.Tensor]:
    return merge_state_dict(recipe(name))


def in_place(name: str) -> dict[str, torch.Tensor]:
    data = resolve(RECIPES[name]["recipe"])
    if "models" in data:
        models = [m["model"] for m in data["models"]]
    else:
        models = [s["model"] for s in data["slices"][0]["sources"]]
    merger = InPlaceMerger(models, data.get("base_model"), data["merge_method"],
                           dtype=data.get("dtype", "float32"),
                           tokenizer_source=data.get("tokenizer_source"), fused=False)
    state = merger.build(recipe(name)).state_dict()
    return {k: v.detach().clone() for k, v in state.items()}


def differences(name: str, ours: dict[str, torch.Tensor], *, zero_signs: bool = True
                ) -> list[str]:
    """What differs from mergekit's golden output, one line per tensor (empty: equal).

    zero_signs: compare every bit (sha256); else as torch.equal does, -0.0 == +0.0 (sha256_eq).
    """
    entry = MANIFEST["recipes"][name]
    want = entry["tensors"]
    missing = sorted(set(want) - set(ours))
    out = [f"missing tensors {missing[:5]}"] if missing else []
    samples = load_folder_file(name)
    for k, w in want.items():
        if k not in ours:
            continue
        t = ours[k]
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype != w["dtype"] or list(t.shape) != w["shape"]:
            out.append(f"{k}: {dtype}{list(t.shape)} != mergekit's {w['dtype']}{w['shape']}")
        elif (tensor_sha256(t) != w["sha256"] if zero_signs
              else equal_sha256(t) != w["sha256_eq"]):
            detail = ""
            if k in samples:
                ref = samples[k]
                diff = (t.double() - ref.double()).abs()
                detail = (f": {int((t != ref).sum())} of {t.numel()} elements differ, max abs "
                          f"diff {float(diff.max()):.3g}")
            out.append(f"{k}: bytes differ{detail}")
    return out


@cache
def load_folder_file(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(GOLDEN / f"{name}.safetensors"))


def test_goldens_cover_every_recipe_and_every_mergekit_method():
    assert set(MANIFEST["recipes"]) == set(RECIPES)
    assert MANIFEST["generator"]["mergekit"] == "0.1.5"
    methods = {spec["recipe"]["merge_method"] for spec in RECIPES.values()}
    assert len(methods) == 20  # mergekit 0.1.5 registers 20 methods; each has a golden


@pytest.mark.skipif(not X86_64, reason="the goldens are x86-64 results (AVX2 kernels)")
def test_cpu_kernels_are_the_goldens():
    # conftest pins them before torch is imported; a mismatch here explains byte differences.
    assert MANIFEST["generator"]["cpu_capability"] == CAPABILITY
    assert torch.backends.cpu.get_cpu_capability() == CAPABILITY, (
        "torch runs other CPU kernels than the goldens were made with: torch was imported "
        "before tests/conftest.py pinned them (tests/cpu_kernels.py)")


def test_the_fixture_has_exact_ties_at_density_cuts():
    base, ft = load_folder(FAMILY / "base"), load_folder(FAMILY / "ft1")
    a = (ft["model.layers.0.mlp.down_proj.weight"] - base["model.layers.0.mlp.down_proj.weight"])
    values = a.abs().reshape(-1).sort(descending=True).values
    k = int(0.3 * values.numel())  # a cut inside a run of equal magnitudes
    assert values[k - 1] == values[k] and values[k - 1] > 0


@pytest.mark.parametrize("name", cases("exact"))
def test_engine_is_bit_equal_to_mergekit(name):
    diff = differences(name, engine(name))
    assert not diff, f"{name}: evomerge's engine differs from mergekit 0.1.5:\n" + "\n".join(
        diff[:20])


@pytest.mark.parametrize("name", cases("exact", in_place=True))
def test_in_place_merger_is_bit_equal_to_mergekit(name):
    diff = differences(name, in_place(name), zero_signs=False)
    assert not diff, f"{name}: the in-place merger differs from mergekit 0.1.5:\n" + "\n".join(
        diff[:20])


def _bound(p: float, n: float) -> float:
    return 5 * math.sqrt(2 * p * (1 - p) / n)


@pytest.mark.parametrize("name", cases("distribution"))
def test_random_masks_match_mergekit_in_distribution(name):
    spec = RECIPES[name]["recipe"]
    base_name, source_name = (f.removeprefix(PLACEHOLDER) for f in base_and_source(spec))
    ours = mask_stats(engine(name), load_folder(FAMILY / base_name),
                      load_folder(FAMILY / source_name))
    theirs = MANIFEST["recipes"][name]["stats"]
    assert set(ours) == set(theirs) and theirs
    bad = []
    for k, m in theirs.items():
        e, p, n = ours[k], m["kept"], m["n"]
        if abs(e["kept"] - p) > _bound(p, n) + 1 / n:
            bad.append(f"{k}: kept {e['kept']:.4f} vs mergekit's {p:.4f} (n={n})")
        if abs(e["rescale"] / m["rescale"] - 1) > 6 * math.sqrt(2 * (1 - p) / (p * n)):
            bad.append(f"{k}: rescale {e['rescale']:.4f} vs mergekit's {m['rescale']:.4f}")
    total = sum(m["n"] for m in theirs.values())

    def pooled(stats, key):
        return sum(s[key] * theirs[k]["n"] for k, s in stats.items()) / total

    p = pooled(theirs, "kept")
    if abs(pooled(ours, "kept") - p) > _bound(p, total):
        bad.append(f"pooled kept {pooled(ours, 'kept'):.4f} vs mergekit's {p:.4f}")
    if spec["merge_method"].startswith("della"):
        ph, pl = pooled(theirs, "kept_high"), pooled(theirs, "kept_low")
        gap_ours = pooled(ours, "kept_high") - pooled(ours, "kept_low")
        tol = 5 * math.sqrt(2 * (ph * (1 - ph) + pl * (1 - pl)) / (total / 2))
        if abs(gap_ours - (ph - pl)) > tol:
            bad.append(f"della magnitude gap {gap_ours:.4f} vs mergekit's {ph - pl:.4f}")
    assert not bad, f"{name}: evomerge's masks differ from mergekit's in distribution:\n" + (
        "\n".join(bad[:20]))


@pytest.mark.parametrize("name", cases("distribution", in_place=True))
def test_random_masks_in_place_equal_the_engine(name):
    ours = in_place(name)
    ref = engine(name)
    assert all(torch.equal(ours[k], v) for k, v in ref.items())


# --- the in-place merger's threshold masks (its CUDA path), run on CPU ---------------------------

TIE_RECIPES = ("ties_gradients_filters", "ties_bf16", "ties_rescale", "breadcrumbs_gamma",
               "breadcrumbs_bf16", "breadcrumbs_ties_filters")


@pytest.fixture
def threshold_path(monkeypatch):
    """Make the in-place merger use its CUDA mask path (orders + thresholds) on CPU."""
    from evomerge.merge.inplace import masks, merger

    def precompute(e, sparsifier, *, on_cpu, host, place, device=None):
        masks.precompute(e, sparsifier, on_cpu=False, host=host, place=place,
                         device=torch.device("cpu"))
    monkeypatch.setattr(merger, "precompute", precompute)


@pytest.mark.parametrize("name", TIE_RECIPES)
def test_threshold_masks_are_bit_equal_to_mergekit(name, threshold_path):
    data = resolve(RECIPES[name]["recipe"])
    merger = InPlaceMerger([m["model"] for m in data["models"]], data["base_model"],
                           data["merge_method"], dtype=data["dtype"], fused=False, chunk=97)
    entries = merger._entries.values()
    assert entries and all(e.orders is not None and e.mag_ranks is None for e in entries)
    state = {k: v.detach() for k, v in merger.build(recipe(name)).state_dict().items()}
    diff = differences(name, state, zero_signs=False)
    assert not diff, f"{name}: the threshold masks differ from mergekit:\n" + "\n".join(diff)


def _tied_entry(values: torch.Tensor, sparsifier):
    from evomerge.merge.inplace.masks import precompute
    from evomerge.merge.inplace.memory import Entry

    flat = values.reshape(1, -1)
    e = Entry(name="t", shape=values.shape, numel=values.numel(), cols=values.shape[-1],
              target=torch.empty(values.numel(), dtype=values.dtype), inputs=flat, keys=(0,))
    precompute(e, sparsifier, on_cpu=False, host=torch.device("cpu"), place=lambda t: t,
               device=torch.device("cpu"))
    return e


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threshold_masks_keep_exactly_the_sorted_selection(dtype):
    """Over every cut of a tie-heavy delta, in chunks, for both ways of listing the ties."""
    from evomerge.merge.inplace.masks import outlier_mask, topk_mask
    from evomerge.merge.inplace.memory import make_workspace
    from evomerge.methods.sparsify import Sparsifier, magnitude_order

    g = torch.Generator().manual_seed(3)
    delta = (torch.randint(-3, 4, (12, 25), generator=g) * 0.125).to(dtype)
    n, chunk = delta.numel(), 41
    ws = make_workspace(1, chunk, torch.device("cpu"), dtype)
    top = _tied_entry(delta, Sparsifier.MAGNITUDE)
    outliers = _tied_entry(delta, Sparsifier.MAGNITUDE_OUTLIERS)
    desc, asc = magnitude_order(delta, True), magnitude_order(delta, False)

    def mask_of(fn):
        out = torch.empty(n, dtype=dtype)
        for lo in range(0, n, chunk):
            fn(out[lo : lo + chunk], lo, min(lo + chunk, n))
        return out

    for i in range(1, 100):
        density = i / 100
        k = max(1, int(density * n))
        want = torch.zeros(n, dtype=dtype)
        want[desc[:k]] = 1
        assert torch.equal(mask_of(topk_mask(top, 0, density, delta.reshape(-1), ws)), want)
        for gamma in (0.0, 0.05, 0.3):
            target = int(density * n)
            n_bot = max(0, n - target - int(gamma * n))
            want = torch.zeros(n, dtype=dtype)
            want[asc[n_bot : n_bot + target]] = 1
            got = mask_of(outlier_mask(outliers, 0, density, gamma, delta.reshape(-1), ws))
            assert torch.equal(got, want), (density, gamma)
