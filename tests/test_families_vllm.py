"""The vLLM column of the architecture matrix (slow: one engine per family, about 10 s each to
start here): a candidate swapped into a running engine scores as a fresh engine started on the
candidate's folder (log-likelihoods within 1e-4, greedy answers equal); after the engine started,
an HF model of the same family still builds and runs (vLLM's compile decorators).

One engine per family, to keep the test cheap: it starts on ft1's folder and scores it (the fresh
engine's scores); then ft2 is swapped in (its log-likelihoods within 1e-3 of the hf backend's for
ft2, so that no tensor of ft1 stayed behind), then ft1 from an HF model in memory, as a search's
candidate is, which must give the fresh engine's scores again. The engine is shut down after its
family.
"""

from __future__ import annotations

import pytest
import torch
from families import cached_families

from evomerge.evaluation.vllm_engine import vllm_available

REASON = vllm_available()
pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(REASON is not None, reason=f"vLLM does not import here: {REASON}")]
# Every family. The tied-head ones (llama, qwen3, gemma, gemma3_text, granite, starcoder2, gpt2,
# falcon) scored the previous candidate's head until the swap re-prepared it (vllm_reload.py); the
# mixtures of experts (mixtral, qwen2_moe) scored unpacked expert weights until the swap packed them
# again. mistral (bfloat16) runs since its fixture was fixed (its fine-tunes were equal to the base:
# the swap had nothing to change). Issue #30.
FAMILIES = ("falcon", "gemma", "gemma2", "gemma3_text", "gpt2", "gpt_neox", "granite", "llama",
            "llama_untied", "mistral", "mixtral", "olmo2", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3",
            "stablelm", "starcoder2")
LL, GEN = "zoo_add", "zoo_add_gen"
N = 20


@pytest.fixture(scope="module")
def fam():
    return cached_families()


def lls(result) -> dict[int, float]:
    return {s["doc_id"]: s["resps"][0][0][0] for s in result.samples}


def answers(result) -> dict[int, str]:
    return {s["doc_id"]: s["resps"][0][0] for s in result.samples}


@pytest.mark.parametrize("family", FAMILIES)
def test_swap_scores_as_a_fresh_engine(fam, family):
    from evomerge.evaluation.evaluator import LmEvalEvaluator
    from evomerge.evaluation.vllm_engine import VllmEvaluator, close_engines
    from evomerge.models.folders import load_causal_lm, load_tokenizer

    f = fam[family]
    vl = VllmEvaluator([LL, GEN], split="test", log_samples=True, model_dir=f["ft1"])
    try:
        fresh = vl.evaluate(None, limit=N)  # the engine as started on ft1's folder
        other = load_causal_lm(f["ft2"])
        hf = LmEvalEvaluator([LL], split="test", log_samples=True).evaluate(other, load_tokenizer(f["base"]),
                                                                            limit=N)
        swapped_other = vl.evaluate(other, limit=N)
        want = lls(hf[LL])
        assert max(abs(v - want[i]) for i, v in lls(swapped_other[LL]).items()) < 1e-3
        assert lls(swapped_other[LL]) != lls(fresh[LL])
        got = vl.evaluate(load_causal_lm(f["ft1"]), limit=N)
        want = lls(fresh[LL])
        assert max(abs(v - want[i]) for i, v in lls(got[LL]).items()) < 1e-4
        assert answers(got[GEN]) == answers(fresh[GEN])
        assert got[GEN].metrics == fresh[GEN].metrics
    finally:
        close_engines()
    # an HF model of the family built after the engine runs (the test-split scoring does this)
    again = load_causal_lm(f["ft2"])
    with torch.no_grad():
        assert torch.isfinite(again(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def _engine_params(worker) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in worker.model_runner.get_model().named_parameters()}


@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen2_moe"])
def test_restore_gives_the_fresh_engine_back(fam, family):
    """After a swap and a restore, every engine tensor equals the fresh engine's bit for bit (the
    experts' packed layout and the tied head's included), and the swap did change them."""
    from evomerge.evaluation.vllm_engine import (
        close_engines,
        resident_engine,
        restore_folder_weights,
        swap_weights,
    )
    from evomerge.models.folders import load_causal_lm
    from evomerge.models.tensor_names import checkpoint_state

    f = fam[family]
    try:
        lm = resident_engine(f["ft1"])
        fresh = lm.model.collective_rpc(_engine_params)[0]
        with torch.no_grad():
            swap_weights(lm, checkpoint_state(load_causal_lm(f["ft2"])))
        swapped = lm.model.collective_rpc(_engine_params)[0]
        restore_folder_weights(lm)
        restored = lm.model.collective_rpc(_engine_params)[0]
    finally:
        close_engines()
    assert any(t.numel() and not torch.equal(t, swapped[n]) for n, t in fresh.items())
    assert [n for n, t in fresh.items() if not torch.equal(t, restored[n])] == []
