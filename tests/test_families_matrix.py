"""The architecture matrix (issue #30): every family of tests/families.py through the merge engine
(against mergekit 0.1.5's goldens, tests/golden/families.json), the in-place merger, LoRA adapters
and a two-generation search with resume, export and materialize. Data-flow merging per family is
tests/test_families_dfs.py; docs/architectures.md prints the matrix from these tests' results
(scripts/architecture_matrix.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from families import FAMILIES, MEMBERS, cached_families, peft_adapter
from mergekit_golden import GOLDEN, describe, load_folder

from evomerge.merge.engine import merge_state_dict
from evomerge.models.sources import load_source
from evomerge.models.tensor_names import checkpoint_state
from evomerge.recipes.parameter_space import Recipe

GOLDENS = json.loads((GOLDEN / "families.json").read_text())["families"]
KINDS = ("task_arithmetic", "ties", "slerp", "linear", "passthrough")
MOE = ("mixtral", "qwen2_moe")
# Where evomerge and mergekit 0.1.5 (with transformers 5.19) differ by design: (family, kind) ->
# (why, which tensors differ). docs/architectures.md says the same.
EXPERTS = ("block_sparse_moe.experts.", "mlp.experts.")
DEVIATIONS = {
    **{(f, k): ("mergekit merges each layer's experts as one fused tensor (transformers 5 holds "
                "them so); evomerge merges each expert's tensor as the folders store it",
                lambda name: any(e in name for e in EXPERTS))
       for f in MOE for k in ("ties", "slerp")},
    ("qwen2_moe", "passthrough"): (
        "mergekit takes qwen2_moe's head and final norm from the first slice; evomerge from the "
        "last, as mergekit does for every other family",
        lambda name: name in ("lm_head.weight", "model.norm.weight")),
}
SEARCH = tuple(sorted(FAMILIES))  # a few seconds each


@pytest.fixture(scope="module")
def fam() -> dict[str, dict[str, Path]]:
    return cached_families()


def _short(state: dict[str, torch.Tensor]) -> dict:
    return {k: [v["sha256_eq"][:20], v["dtype"], v["shape"]] for k, v in describe(state).items()}


def _recipe_dict(fam, family: str, kind: str) -> dict:
    """The recipe the goldens were made with (scripts/make_family_golden.py)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from make_family_golden import family_dtype, recipes

    return recipes(fam[family], family_dtype(family))[kind]


def _recipe(fam, family: str, kind: str) -> Recipe:
    return Recipe.from_dict(_recipe_dict(fam, family, kind))


# --- merges against mergekit 0.1.5 ---------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fixture_bytes_are_the_goldens_inputs(fam, family):
    """The families built here are byte for byte the ones the goldens were made from."""
    for m in MEMBERS:
        assert _short(load_folder(fam[family][m])) == GOLDENS[family]["inputs"][m], m


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_fine_tune_differs_from_the_base(fam, family):
    """Each fine-tune carries its perturbation in the saved dtype (mistral's bfloat16 members were
    once all the base: a merge or a swap of them could not be told from none)."""
    base = _short(load_folder(fam[family]["base"]))
    for m in MEMBERS:
        if m != "base":
            assert _short(load_folder(fam[family][m])) != base, m


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merge_equals_mergekit(fam, family, kind):
    golden = GOLDENS[family]["recipes"][kind]
    if "error" in golden:  # mergekit 0.1.5's architecture files do not fit transformers 5's folders
        _check_without_mergekit(fam, family, kind, golden["error"])
        return
    ours = _short(merge_state_dict(_recipe(fam, family, kind)))
    assert sorted(ours) == sorted(golden)
    differ = [k for k in golden if ours[k] != golden[k]]
    if (family, kind) in DEVIATIONS:
        _, allowed = DEVIATIONS[family, kind]
        assert differ and all(allowed(k) for k in differ), differ[:5]
        if kind == "passthrough":  # the head of the last slice's model
            last = GOLDENS[family]["inputs"]["ft2"]
            assert all(ours[k] == last[k] for k in differ)
        return
    assert not differ, differ[:5]


def _check_without_mergekit(fam, family: str, kind: str, error: str) -> None:
    """Where mergekit cannot merge a family: task_arithmetic and linear against their formulas."""
    if kind not in ("task_arithmetic", "linear"):
        pytest.skip(f"mergekit 0.1.5 refuses {family}: {error[:120]}")
    ours = merge_state_dict(_recipe(fam, family, kind))
    states = {m: load_folder(fam[family][m]) for m in MEMBERS}
    weights = [m["parameters"]["weight"] for m in _recipe_dict(fam, family, kind)["models"]]
    fts = [states[m] for m in ("ft1", "ft2", "ft3")]
    assert sorted(ours) == sorted(states["base"])
    for k, base in states["base"].items():
        if kind == "task_arithmetic":
            want = base + sum(w * (ft[k] - base) for w, ft in zip(weights, fts, strict=True))
        else:
            want = sum(w * ft[k] for w, ft in zip(weights, fts, strict=True)) / sum(weights)
        assert torch.allclose(ours[k], want, atol=1e-6), k


# --- the in-place merger equals the engine -------------------------------------------------------
@pytest.mark.parametrize("kind", ["task_arithmetic", "ties"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_inplace_merger_equals_the_engine(fam, family, kind):
    from evomerge.merge.inplace.merger import InPlaceMerger

    recipe = _recipe(fam, family, kind)
    f = fam[family]
    merger = InPlaceMerger([str(f[m]) for m in ("ft1", "ft2", "ft3")], str(f["base"]), kind,
                           dtype=recipe.dtype)
    got = checkpoint_state(merger.build(recipe))
    want = merge_state_dict(recipe)
    assert sorted(got) == sorted(want)
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, differ[:5]


# --- LoRA adapters: short and full-path target_modules equal peft --------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_adapter_equals_peft(fam, family, tmp_path):
    """all-linear (peft writes short names or full module paths) and the same modules by their
    short names: every adapter reads as peft's merge_and_unload."""
    from contextlib import ExitStack

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if FAMILIES[family].dtype != torch.float32:
        pytest.skip("peft merges bfloat16 LoRA factors in bfloat16; evomerge in float32")
    base = fam[family]["base"]
    full = peft_adapter(base, tmp_path / "full", "all-linear")
    targets = json.loads((full / "adapter_config.json").read_text())["target_modules"]
    shorts = sorted({t.rsplit(".", 1)[-1] for t in targets})
    short = peft_adapter(base, tmp_path / "short", shorts)
    from evomerge.core.errors import MergeError

    for adapter in (full, short):
        if "target_parameters" in json.loads((adapter / "adapter_config.json").read_text()) and \
                json.loads((adapter / "adapter_config.json").read_text())["target_parameters"]:
            # peft's all-linear on fused MoE experts targets parameters, not modules
            with pytest.raises(MergeError, match="target_parameters"):
                load_source(f"{base}+{adapter}")
            continue
        src = load_source(f"{base}+{adapter}")
        peft = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter))
        merged = checkpoint_state(peft.merge_and_unload())
        assert src.adapter.modules
        with ExitStack() as stack:
            for name in merged:
                assert torch.allclose(src.read(name, stack), merged[name], atol=1e-6), name


# --- a two-generation search with resume, export and materialize ---------------------------------
def _search_config(fam, family: str, run_dir: Path, generations: int):
    from evomerge.search.config import SearchConfig

    f = fam[family]
    return SearchConfig.from_dict({
        "models": [str(f[m]) for m in ("ft1", "ft2", "ft3")], "base_model": str(f["base"]),
        "search_space": "ps_task_arithmetic", "dtype": "float32", "batch_size": 16, "threads": 1,
        "tasks": [{"name": "zoo_add", "metric": "acc", "limit": 6}],
        "optimizer": {"name": "cma", "popsize": 3}, "budget": {"generations": generations},
        "seed": 1, "rescore_top_k": 1, "run_dir": str(run_dir)})


@pytest.mark.slow
@pytest.mark.parametrize("family", SEARCH)
def test_search_resume_export_materialize(fam, family, tmp_path):
    """One generation, resumed to two, the best exported as a mergekit recipe and materialized:
    the folder is the engine's merge of the exported recipe."""
    from evomerge.runs.export import recipe_from_run
    from evomerge.runs.materialize import materialize
    from evomerge.runs.start import run_search

    run_dir = tmp_path / "run"
    first = run_search(_search_config(fam, family, run_dir, 1), run_dir=run_dir, quiet=True)
    assert first.generations == 1
    out = run_search(_search_config(fam, family, run_dir, 2), run_dir=run_dir, resume=True,
                     quiet=True)
    assert out.finished and out.generations == 2 and out.best_fitness is not None
    recipe, _ = recipe_from_run(run_dir)
    exported = Recipe.from_yaml(recipe.to_yaml())
    folder, _ = materialize(run_dir, tmp_path / "best", score_test=False)
    got = load_folder(folder)
    want = merge_state_dict(exported)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
