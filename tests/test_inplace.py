"""The in-place merger: equal to the engine for every method, no growth, clear refusals."""

from __future__ import annotations

import gc
import warnings
from pathlib import Path

import pytest
import torch
from merge_helpers import model_family
from whole_recipes import WHOLE, whole_recipe, whole_sources

from evomerge.merge.engine import merge_state_dict
from evomerge.merge.inplace import InPlaceMerger, memory_plan_from_shapes, plan
from evomerge.merge.inplace import fused as fused_mod
from evomerge.models import sources as sources_mod
from evomerge.recipes.parameter_space import Recipe

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
           "breadcrumbs_ties", "della", "della_linear")
EXTRA = {"breadcrumbs": {"gamma": 0.05}, "breadcrumbs_ties": {"gamma": 0.05},
         "della": {"epsilon": 0.1}, "della_linear": {"epsilon": 0.1}}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[str]:
    """A base and three fine-tunes: 6 layers, hidden 24 (tensors of 24 to 2472 elements)."""
    root = tmp_path_factory.mktemp("inplace")
    return [str(p) for p in model_family(root, "llama", n=3, layers=6, hidden=24)]


def per_model(method: str, i: int) -> dict:
    p: dict = {"weight": [0.3 + 0.2 * i, 0.9, -0.2 + 0.1 * i]}
    if method not in ("linear", "task_arithmetic"):
        p["density"] = [{"filter": "mlp", "value": [0.35, 0.8]}, {"value": 0.5 + 0.1 * i}]
    return {**p, **EXTRA.get(method, {})}


def models_recipe(method: str, fam: list[str], dtype: str, **extra) -> Recipe:
    base, fts = fam[0], fam[1:]
    data: dict = {"merge_method": method, "base_model": base, "dtype": dtype,
                  "models": [{"model": m, "parameters": per_model(method, i)}
                             for i, m in enumerate(fts)], **extra}
    if method == "linear":
        data["parameters"] = {"weight": 0.25, **data.get("parameters", {})}
    return Recipe.from_dict(data)


def slices_recipe(method: str, fam: list[str], dtype: str, bounds=(0, 2, 5, 6),
                  slice_params=None, **extra) -> Recipe:
    """The `models:` recipe's sources as slices over layer groups, with slice parameters."""
    base, fts = fam[0], fam[1:]
    order = [*fts, base]  # the models-form order: the unlisted base comes last
    slices = []
    for j, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
        sources = [{"model": m, "layer_range": [lo, hi],
                    **({"parameters": per_model(method, i)} if m != base else {})}
                   for i, m in enumerate(order)]
        params = (slice_params or {}).get(j)
        if params is None:
            params = {"weight": 0.5 + 0.1 * j} if method == "linear" else {"lambda": 1 - 0.1 * j}
        slices.append({"sources": sources, "parameters": params})
    return Recipe.from_dict({"merge_method": method, "base_model": base, "dtype": dtype,
                             "slices": slices, **extra})


def assert_equal_to_engine(merger: InPlaceMerger, recipe: Recipe) -> None:
    expected = merge_state_dict(recipe, dtype=merger.dtype)
    state = merger.build(recipe).state_dict()
    different = [k for k, v in expected.items() if not torch.equal(v, state[k].cpu())]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# --- equality with the engine ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", METHODS)
def test_equal_to_engine_for_every_method(family, method, dtype, monkeypatch):
    # chunk=37 splits every tensor at odd places: results must not depend on the chunking.
    monkeypatch.delenv("EVOMERGE_FUSED", raising=False)
    merger = InPlaceMerger(family[1:], family[0], method, dtype=dtype, chunk=37)
    assert not merger._fused  # small model: the chunked path (the fused one: tests below)
    assert_equal_to_engine(merger, models_recipe(method, family, dtype, mask_seed=5))
    assert_equal_to_engine(merger, slices_recipe(method, family, dtype, mask_seed=5))
    # another mask seed regenerates the uniforms; another recipe reuses the same model
    assert_equal_to_engine(merger, models_recipe(method, family, dtype, mask_seed=11))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", sorted(WHOLE))
def test_equal_to_engine_for_every_whole_tensor_method(family, method, dtype):
    """slerp ... ramplus_tl and passthrough: with gradients, filters and slices, two dtypes."""
    models, base = whole_sources(method, family)
    merger = InPlaceMerger(models, base, method, dtype=dtype, chunk=37)
    rows = len(models) + (base is not None)  # every source is a row, the base too
    assert memory_plan_from_shapes({"w": (4, 6)}, method, rows).parts["whole"][1] > 0
    assert_equal_to_engine(merger, Recipe.from_dict(whole_recipe(method, family, dtype)))
    assert_equal_to_engine(merger, Recipe.from_dict(
        whole_recipe(method, family, dtype, slices=True)))


def test_the_in_place_merger_covers_every_mergekit_method():
    from evomerge.methods.registry import (
        EVOMERGE_ONLY,
        MERGEKIT_METHODS,
        MERGEKIT_ONLY,
        method_names,
    )

    assert sorted({*METHODS, *WHOLE}) == sorted({*MERGEKIT_METHODS, *EVOMERGE_ONLY}) == method_names()
    assert MERGEKIT_ONLY == ()


FUSED = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "della", "della_linear")


@pytest.mark.parametrize("method", FUSED)
def test_fused_kernels_are_used_and_equal_the_engine(family, method):
    # CPU float32: whole-tensor compiled kernels, checked against the chunked path once
    merger = InPlaceMerger(family[1:], family[0], method, dtype="float32", fused=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback to the chunked path
        assert_equal_to_engine(merger, models_recipe(method, family, "float32", mask_seed=5))
        assert_equal_to_engine(merger, slices_recipe(method, family, "float32", mask_seed=9))
    assert merger._fused and merger._fused_checked


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della"])
def test_fused_kernels_with_dense_and_zeroed_rows(family, method):
    # density 1 keeps a row whole (also under the L1 rescale); density 0 zeroes it (that
    # tensor takes the chunked path); a tiny density keeps one element (ties)
    densities = (1.0, 0.0, 0.3) if method != "ties" else (1.0, 1e-9, 0.3)
    models = [{"model": m, "parameters": {"weight": 0.7, "density": d,
                                          **EXTRA.get(method, {})}}
              for m, d in zip(family[1:], densities, strict=True)]
    models[1]["parameters"]["density"] = [{"filter": "mlp", "value": densities[1]},
                                          {"value": 0.5}]
    recipe = Recipe.from_dict({"merge_method": method, "base_model": family[0],
                               "models": models, "dtype": "float32", "mask_seed": 3})
    merger = InPlaceMerger(family[1:], family[0], method, dtype="float32", fused=True)
    assert_equal_to_engine(merger, recipe)
    assert merger._fused


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della"])
def test_chunked_path_without_fused_kernels_equals_the_engine(family, method, monkeypatch):
    merger = InPlaceMerger(family[1:], family[0], method, dtype="float32", fused=False,
                           chunk=37)
    assert_equal_to_engine(merger, models_recipe(method, family, "float32", mask_seed=5))
    # fused=None: off for small models unless EVOMERGE_FUSED=1, off everywhere with 0
    assert not InPlaceMerger(family[1:], family[0], method, dtype="float32")._fused
    monkeypatch.setenv("EVOMERGE_FUSED", "1")
    assert InPlaceMerger(family[1:], family[0], method, dtype="float32")._fused
    assert not InPlaceMerger(family[1:], family[0], method, dtype="bfloat16")._fused
    monkeypatch.setenv("EVOMERGE_FUSED", "0")
    assert not InPlaceMerger(family[1:], family[0], method, dtype="float32")._fused


def test_a_failing_compile_falls_back_to_the_chunked_path(family, monkeypatch):
    def no_compiler(name, fn, variant):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run
    monkeypatch.setattr(fused_mod, "_kernel", no_compiler)
    merger = InPlaceMerger(family[1:], family[0], "ties", dtype="float32", fused=True)
    with pytest.warns(UserWarning, match="fused kernels failed"):
        assert_equal_to_engine(merger, models_recipe("ties", family, "float32"))
    assert not merger._fused


def test_a_fused_kernel_that_differs_is_dropped(family, monkeypatch):
    real = fused_mod._kernel

    def off_by_one_ulp(name, fn, variant):
        compiled = real(name, fn, variant)

        def run(*args):
            compiled(*args)
            if name == "combine":
                target = args[0]
                target.copy_(torch.nextafter(target, torch.full_like(target, 1e9)))
        return run
    monkeypatch.setattr(fused_mod, "_kernel", off_by_one_ulp)
    merger = InPlaceMerger(family[1:], family[0], "dare_ties", dtype="float32", fused=True)
    with pytest.warns(UserWarning, match="differs from the chunked path"):
        assert_equal_to_engine(merger, models_recipe("dare_ties", family, "float32"))
    assert not merger._fused
    assert_equal_to_engine(merger, models_recipe("dare_ties", family, "float32", mask_seed=4))


@pytest.mark.parametrize("method,params", [
    ("ties", {"rescale": True}),
    ("ties", {"rescale": True, "rescale_mode": "inverse_density", "normalize": False}),
    ("dare_ties", {"rescale_mode": "inverse_density", "lambda": 0.7}),
    ("dare_linear", {"rescale": False, "normalize": True}),
    ("della", {"rescale": False}),
    ("breadcrumbs", {"rescale": True}),
    ("task_arithmetic", {"normalize": True, "lambda": 1.3}),
    ("linear", {"normalize": False}),
])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_equal_to_engine_with_other_settings(family, method, params, dtype):
    merger = InPlaceMerger(family[1:], family[0], method, dtype=dtype, chunk=64)
    recipe = slices_recipe(method, family, dtype, bounds=(0, 3, 6),
                           slice_params={0: params, 1: {**params, "lambda": 0.5}}
                           if method != "linear" else {0: {"weight": 0.3, **params}})
    assert_equal_to_engine(merger, recipe)


def test_equal_with_extreme_densities(family):
    # density 1 (dense), tiny (one element kept), and ties in |delta| (bfloat16 has many)
    merger = InPlaceMerger(family[1:], family[0], "ties", dtype="bfloat16", chunk=50)
    models = [{"model": m, "parameters": {"weight": 1.0, "density": d}}
              for m, d in zip(family[1:], (1.0, 1e-9, 0.3), strict=True)]
    recipe = Recipe.from_dict({"merge_method": "ties", "base_model": family[0],
                               "models": models, "dtype": "bfloat16"})
    assert_equal_to_engine(merger, recipe)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_at_density_zero_is_finite_and_equals_the_engine(family, method):
    """Density 0 keeps nothing; the inverse-density rescale must not divide by it (it gave NaN)."""
    merger = InPlaceMerger(family[1:], family[0], method, dtype="float32", chunk=50)
    models = [{"model": m, "parameters": {"weight": 1.0, "density": d, "gamma": 0.01}}
              for m, d in zip(family[1:], (0.0, 0.5, 0.0), strict=True)]
    recipe = Recipe.from_dict({"merge_method": method, "base_model": family[0], "models": models,
                               "dtype": "float32", "parameters": {"rescale": True, "rescale_mode": "inverse_density"}})
    state = merger.build(recipe).state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())
    assert_equal_to_engine(merger, recipe)


@pytest.mark.parametrize("arch,tied", [("gpt2", True), ("qwen2", True), ("mistral", False)])
def test_equal_to_engine_for_other_architectures(tmp_path, arch, tied):
    fam = [str(p) for p in model_family(tmp_path, arch, n=2, tied=tied)]
    for method in ("ties", "linear"):
        merger = InPlaceMerger(fam[1:], fam[0], method, chunk=50)
        models = [{"model": m, "parameters": {"weight": [0.5, 1.0], "density": 0.4}}
                  for m in fam[1:]]
        if method == "linear":
            models = [{"model": m["model"], "parameters": {"weight": [0.5, 1.0]}}
                      for m in models]
        recipe = Recipe.from_dict({"merge_method": method, "base_model": fam[0],
                                   "models": models, "parameters": {"weight": 0.3}
                                   if method == "linear" else {}})
        assert_equal_to_engine(merger, recipe)


def test_stream_placement_on_cpu_equals_resident(family):
    merger = InPlaceMerger(family[1:], family[0], "della", placement="stream", chunk=100)
    assert_equal_to_engine(merger, slices_recipe("della", family, "float32", mask_seed=2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("placement", ["resident", "stream"])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "linear"])
def test_gpu_placements_equal_the_engine_on_gpu(family, placement, method):
    merger = InPlaceMerger(family[1:], family[0], method, device="cuda", placement=placement)
    recipe = slices_recipe(method, family, "float32", mask_seed=3)
    expected = merge_state_dict(recipe, device="cuda", dtype=torch.float32)
    state = merger.build(recipe).state_dict()
    assert all(v.device.type == "cuda" for v in state.values())
    assert all(torch.equal(v, state[k].cpu()) for k, v in expected.items())


def test_equal_to_engine_on_the_zoo(zoo_dir):
    zoo = Path(zoo_dir)
    fam = [str(zoo / m) for m in ("base", "spec_add", "spec_rev", "spec_sub")]
    for method in ("ties", "dare_ties"):
        merger = InPlaceMerger(fam[1:], fam[0], method)
        assert_equal_to_engine(merger, slices_recipe(method, fam, "float32", bounds=(0, 2, 4),
                                                     mask_seed=1))


# --- in place: what changes, what is refused ----------------------------------------------------


def test_a_recipe_changing_one_slice_changes_only_its_tensors(family):
    merger = InPlaceMerger(family[1:], family[0], "dare_ties", chunk=64)
    a = slices_recipe("dare_ties", family, "float32", bounds=(0, 2, 4, 6))
    b = slices_recipe("dare_ties", family, "float32", bounds=(0, 2, 4, 6),
                      slice_params={1: {"lambda": 0.4}})
    model = merger.build(a)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert merger.build(b) is model
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    middle = {k for k in before if k.startswith(("model.layers.2.", "model.layers.3."))}
    assert changed == middle


def test_other_recipes_are_refused_with_the_difference_named(family, tmp_path):
    merger = InPlaceMerger(family[1:], family[0], "ties")
    good = models_recipe("ties", family, "float32")
    merger.build(good)
    data = good.model_dump(exclude_none=True)
    cases = [
        ({**data, "merge_method": "dare_ties"}, "merge_method 'dare_ties' differs"),
        ({**data, "models": data["models"][::-1]}, "differ from the merger's"),
        ({**data, "models": data["models"][:2]}, "differ from the merger's"),
        ({**data, "base_model": family[1]}, "base_model"),
        ({**data, "dtype": "bfloat16"}, "dtype 'bfloat16' differs"),
        ({**data, "models": [{**data["models"][0], "parameters": {"density": 0.5}},
                             *data["models"][1:]]}, "missing parameter 'weight'"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            merger.build(Recipe.from_dict(bad))
    shifted = slices_recipe("ties", family, "float32", bounds=(0, 3, 6))
    shifted_data = shifted.model_dump(exclude_none=True)
    for src in shifted_data["slices"][1]["sources"]:
        src["layer_range"] = [2, 5]
    with pytest.raises(ValueError, match="layer structure"):
        merger.build(Recipe.from_dict(shifted_data))
    # passthrough is built over the merger's layer structure; a layer-stacking recipe is refused
    stacker = InPlaceMerger(family[1:2], None, "passthrough")
    stacked = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": family[1], "layer_range": r}]} for r in ([0, 4], [2, 6])]}
    with pytest.raises(ValueError, match="layer structure"):
        stacker.build(Recipe.from_dict(stacked))
    with pytest.raises(ValueError, match="placement"):
        InPlaceMerger(family[1:], family[0], "ties", placement="everywhere")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model folder .* does not exist"):
        InPlaceMerger([str(tmp_path / "nope")], family[0], "ties")


# --- memory -------------------------------------------------------------------------------------


def rss() -> int:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss


@pytest.mark.slow
def test_memory_does_not_grow_from_candidate_to_candidate(tmp_path):
    # A random Llama of 53M parameters (hidden 768, 9 layers), a base and two fine-tunes.
    fam = [str(p) for p in model_family(tmp_path, "llama", n=2, layers=9, hidden=768)]
    merger = InPlaceMerger(fam[1:], fam[0], "dare_ties")
    n_params = sum(p.numel() for p in merger.model.parameters())
    assert n_params >= 50_000_000
    model_bytes = n_params * 4
    g = torch.Generator().manual_seed(0)
    at = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier on a shared machine; memory does not depend on it
    try:
        _build_candidates(merger, fam, g, at)
    finally:
        torch.set_num_threads(threads)
    assert at[100] - at[10] <= max(16 * 2**20, 0.02 * model_bytes), at


def _build_candidates(merger: InPlaceMerger, fam: list[str], g: torch.Generator,
                      at: dict[int, int]) -> None:
    for candidate in range(1, 101):
        w = torch.rand(4, generator=g).tolist()
        recipe = Recipe.from_dict({
            "merge_method": "dare_ties", "base_model": fam[0], "mask_seed": 3,
            "models": [{"model": m, "parameters": {"weight": [w[2 * i], w[2 * i + 1]],
                                                   "density": 0.2 + 0.6 * w[i]}}
                       for i, m in enumerate(fam[1:])]})
        merger.build(recipe)
        if candidate in (10, 100):
            at[candidate] = rss()


def test_memory_plan_reads_headers_only_and_counts_the_resident_bytes(family, monkeypatch):
    def no_reads(*args, **kwargs):
        raise AssertionError("plan() read a tensor")

    monkeypatch.setattr(sources_mod.SourceModel, "read", no_reads)
    p = plan(family[1:], family[0], "ties", dtype="bfloat16")
    monkeypatch.undo()
    merger = InPlaceMerger(family[1:], family[0], "ties", dtype="bfloat16")
    entries = merger._entries.values()
    n_params = sum(e.numel for e in entries)
    assert p.parameters == n_params and p.rows == 3
    assert p.parts["inputs"][1] == sum(e.inputs.numel() * e.inputs.element_size()
                                       for e in entries)
    assert p.parts["base"][1] == p.parts["target"][1] == n_params * 2
    # on CPU the magnitude sparsifiers keep each element's rank in the order (int32)
    assert p.parts["orders"][1] == sum(e.mag_ranks.numel() * 4 for e in entries)
    assert "uniforms" not in p.parts
    dare = plan(family[1:], family[0], "dare_ties", placement="stream", device="cuda")
    assert dare.parts["uniforms"] == ("host", 3 * n_params * 8)
    assert dare.parts["target"][0] == "device" and dare.parts["inputs"][0] == "host"


def llama_7b_shapes() -> dict[str, tuple[int, ...]]:
    """Llama-2-7B: hidden 4096, intermediate 11008, 32 layers, vocabulary 32000."""
    h, inter, vocab = 4096, 11008, 32000
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h),
                                          "lm_head.weight": (vocab, h), "model.norm.weight": (h,)}
    for i in range(32):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"model.layers.{i}.self_attn.{name}.weight"] = (h, h)
        for name in ("gate_proj", "up_proj"):
            shapes[f"model.layers.{i}.mlp.{name}.weight"] = (inter, h)
        shapes[f"model.layers.{i}.mlp.down_proj.weight"] = (h, inter)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (h,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (h,)
    return shapes


def test_memory_plan_of_a_7b_model_with_three_sources_in_bf16():
    p = memory_plan_from_shapes(llama_7b_shapes(), "task_arithmetic", 3, dtype="bfloat16",
                                device="cuda")
    assert p.parameters == 6_738_415_616
    core = sum(p.parts[k][1] for k in ("base", "inputs", "target"))
    assert core == 5 * 2 * p.parameters  # 67.4 GB: base + 3 task vectors + target
    assert 67e9 < core < 68e9
    assert p.device_bytes < 73e9  # + whole-tensor workspaces on CUDA (4.7 GB)
    stream = memory_plan_from_shapes(llama_7b_shapes(), "task_arithmetic", 3, dtype="bfloat16",
                                     device="cuda", placement="stream")
    assert stream.host_bytes == 4 * 2 * p.parameters
    assert stream.device_bytes < 20e9  # the target and one tensor's buffers (19.2 GB)
