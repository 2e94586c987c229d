"""evomerge refine (search/refine.py, merge/differentiable.py, search/refine_log.py): the gradient
moves the weight genes and lowers the training loss, the refined candidate is a record the history
ranks and export writes, an unsupported method is refused, two refines are equal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_bad_inputs import search_config, write_yaml

from evomerge.cli.main import main
from evomerge.core.errors import ConfigError
from evomerge.merge.differentiable import tensor_forms
from evomerge.merge.engine import merge_state_dict, plan_merge
from evomerge.runs.export import ranked_candidates
from evomerge.runs.folder import RunFolder
from evomerge.runs.refine import Start, refine_run
from evomerge.search.history import RunHistory
from evomerge.search.refine import RefineOptions
from evomerge.search.refine_log import REFINED

OPTS = RefineOptions(steps=4, lr=0.1, batch_items=4, items=8)


@pytest.fixture(scope="module")
def finished(zoo_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refine")
    cfg = write_yaml(tmp / "c.yml", search_config(zoo_dir, tmp))
    assert main(["search", str(cfg), "--quiet"]) == 0
    return tmp


def test_the_forms_at_the_start_weights_are_the_merge(zoo_dir):
    from evomerge.recipes.parameter_space import Recipe

    recipe = Recipe.model_validate({
        "merge_method": "ties", "base_model": str(zoo_dir / "base"), "dtype": "float32",
        "models": [{"model": str(zoo_dir / f"spec_{s}"), "parameters": {"weight": w, "density": 0.5}}
                   for s, w in (("add", 0.7), ("rev", 1.2))]})
    merged = merge_state_dict(recipe, dtype="float32")
    forms = tensor_forms(plan_merge(recipe), recipe)
    for name, (form, job) in forms.items():
        w = torch.tensor([job.per_source[k]["weight"] for k in form.keys])
        assert torch.allclose(form.merged(w), merged[name], atol=1e-5), name


def test_refine_moves_the_weights_lowers_the_loss_and_logs_a_ranked_exportable_candidate(finished, tmp_path):
    run = finished / "run"
    out = refine_run(run, OPTS, start=Start.BEST_PLAIN, quiet=True)
    res = out.result
    assert not np.array_equal(res.genome, res.start_genome)
    assert res.end_loss < res.start_loss
    assert ((res.genome >= 0) & (res.genome <= 1)).all()
    hist = RunHistory(RunFolder.open(run).records())
    refined = [r for r in hist.evaluations() if r.generation == REFINED]
    assert {r.type for r in refined} == {"candidate", "rescore"}
    assert all(r.genome == [float(x) for x in res.genome] for r in refined)
    ranked = [r.recipe_hash for r in ranked_candidates(hist.records)]
    assert out.logged.rescore.recipe_hash in ranked
    rank = ranked.index(out.logged.rescore.recipe_hash) + 1
    dest = tmp_path / "r.yml"
    assert main(["export", str(run), "--rank", str(rank), "--out", str(dest)]) == 0
    assert dest.read_text()
    # determinism: a second refine from the same start trains the same genome
    again = refine_run(run, OPTS, start=Start.BEST_PLAIN, quiet=True)
    assert np.array_equal(again.result.genome, res.genome)
    assert again.result.losses == res.losses


def test_a_method_without_a_differentiable_form_is_refused(zoo_dir, tmp_path):
    cfg = write_yaml(tmp_path / "c.yml", search_config(zoo_dir, tmp_path, search_space="ps_multislerp"))
    assert main(["search", str(cfg), "--quiet"]) == 0
    with pytest.raises(ConfigError, match="multislerp.*not differentiated"):
        refine_run(tmp_path / "run", OPTS, quiet=True)


def test_weight_genes_that_decode_to_one_value_are_refused_not_mapped_wrong():
    """gene_map tells genes apart by their decoded weights: two genes of other bounds that decode
    to the same value would map a tensor to the wrong gene, so the space is refused."""
    from types import SimpleNamespace

    from evomerge.search.codecs.parameter import Gene
    from evomerge.search.refine import WEIGHT, gene_map

    # probe values 1/3 and 2/3: 0 + 1/3 * 1.0 == 0 + 2/3 * 0.5
    codec = SimpleNamespace(genes=[Gene(WEIGHT, "a", "global", 0.0, 1.0), Gene(WEIGHT, "b", "global", 0.0, 0.5)])
    with pytest.raises(ConfigError, match="cannot be told apart"):
        gene_map(codec, np.zeros(2), plan=None)
