"""Data-flow merging on every family of tests/families.py: each family whose blocks fold has its
folded model (mergekit passthrough, written by `evomerge merge`) equal to the in-memory scaled
path; the others are refused with their own reason before any weights are read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from families import FAMILIES, LAYERS, cached_families

from evomerge.merge.dataflow import assemble
from evomerge.merge.writer import write_path_model
from evomerge.models.architectures import ARCHITECTURES, ArchitectureError
from evomerge.models.folders import load_causal_lm
from evomerge.recipes.fold import passthrough_recipe
from evomerge.recipes.layer_path import PathRecipe

MODEL_TYPES = {"llama_untied": "llama"}
FOLDING = sorted(f for f in FAMILIES if MODEL_TYPES.get(f, f) in ARCHITECTURES)
REFUSED = {"gemma": "RMSNorm weights as \\(1 \\+ w\\)", "gemma2": "Gemma 2 has sandwich",
           "gemma3_text": "Gemma 3 has sandwich", "olmo2": "post-norm only"}
IDS = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def fam():
    return cached_families()


def random_path(names: list[str], n_steps: int, rng: np.random.Generator) -> PathRecipe:
    steps = [{"model": names[0], "layer": 0, "scale": 1.0}]
    for _ in range(n_steps - 2):
        steps.append({"model": names[int(rng.integers(len(names)))],
                      "layer": int(rng.integers(LAYERS)),
                      "scale": float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))})
    steps.append({"model": names[0], "layer": LAYERS - 1, "scale": 1.5})
    return PathRecipe.from_dict({"path": steps, "dtype": "float32"})


def test_every_family_is_covered():
    assert set(FOLDING) | set(REFUSED) == set(FAMILIES)


@pytest.mark.parametrize("family", FOLDING)
def test_folded_model_equals_the_scaled_path(fam, family, tmp_path):
    torch.manual_seed(0)
    names = [str(fam[family][m]) for m in ("base", "ft1")]
    models = {n: load_causal_lm(n) for n in names}
    rng = np.random.default_rng(sorted(FAMILIES).index(family))
    for k, n_steps in enumerate((3, 7)):
        recipe = random_path(names, n_steps, rng)
        path_model = assemble(recipe, models)
        folded = load_causal_lm(write_path_model(recipe, tmp_path / f"fold{k}"))
        assert folded.config.num_hidden_layers == n_steps
        with torch.no_grad():
            a, b = path_model(input_ids=IDS).logits, folded(input_ids=IDS).logits
        scale = a.abs().max().item()
        assert (a - b).abs().max().item() < 1e-4 * max(1.0, scale), (family, n_steps)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_non_folding_family_is_refused_with_its_reason(fam, family):
    recipe = PathRecipe.from_dict({"path": [{"model": str(fam[family]["base"]), "layer": 0}]})
    with pytest.raises(ArchitectureError, match=REFUSED[family]):
        passthrough_recipe(recipe)
