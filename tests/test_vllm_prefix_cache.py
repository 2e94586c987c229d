"""vLLM prefix caching within a candidate (evaluation/vllm_engine.py): on by default, reset at every
weight swap, so that two candidates in a row score as each alone.

The zoo's prompts are short (64 positions), and vLLM's CPU build caches whole blocks of 128 tokens
by default, so these engines use blocks of 32 (the least the CPU attention takes) and a system
instruction of 37 characters before every prompt: all prompts share one block, as a task's fixed
few-shot examples would, so within one evaluation every prompt after the first reads it from the
cache. Two engines, started once for the module: the swapped one (prefix caching on, started from
spec_add) and a fresh one started from B's folder with prefix caching off (nothing cached, ever).
"""

from __future__ import annotations

import pytest

from evomerge.evaluation.vllm_engine import vllm_available

REASON = vllm_available()
pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(REASON is not None, reason=f"vLLM does not import here: {REASON}")]
GEN, LL = "zoo_rev_gen", "zoo_rev"
N = 128  # items per task: four batches of 32
OPTIONS = dict(split="test", log_samples=True, block_size=32, system_instruction="Reverse the letters between r: and =.")


@pytest.fixture(scope="module")
def engines(zoo_dir):
    """The swapped engine (prefix caching on) and a fresh engine on B's folder (caching off)."""
    from evomerge.evaluation.vllm_engine import VllmEvaluator

    swapped = VllmEvaluator([GEN, LL], model_dir=zoo_dir / "spec_add", **OPTIONS)
    fresh = VllmEvaluator([GEN, LL], model_dir=zoo_dir / "spec_rev", prefix_caching=False, **OPTIONS)
    return swapped, fresh


@pytest.fixture(scope="module")
def models(zoo_dir):
    from evomerge.models.folders import load_causal_lm

    return {name: load_causal_lm(zoo_dir / f"spec_{name}") for name in ("sub", "rev")}


@pytest.fixture
def cached_tokens(engines):
    """Counts the prompt tokens the swapped engine served from its prefix cache."""
    llm = engines[0].engine().model
    real, counted = llm.generate, []

    def generate(*args, **kwargs):
        out = real(*args, **kwargs)
        counted.extend(o.num_cached_tokens or 0 for o in out)
        return out

    llm.generate = generate
    yield counted
    llm.generate = real


def answers(result) -> dict[int, str]:
    """Raw greedy answers per item (before the regex filter: any token that differs shows)."""
    return {s["doc_id"]: s["resps"][0][0] for s in result.samples}


def lls(result) -> dict[int, float]:
    return {s["doc_id"]: s["resps"][0][0][0] for s in result.samples}


def test_two_candidates_in_a_row_score_as_each_alone_with_prefix_caching(engines, models, cached_tokens):
    """A, then B on the swapped engine: B's answers and log-likelihoods are those of a fresh engine
    on B's folder with no prefix cache, though B's prompts read the shared block that B's first
    prompt computed (reuse within a candidate) and A's blocks were computed on the same prompts."""
    swapped, fresh = engines
    alone = fresh.evaluate(None, limit=N)
    a = swapped.evaluate(models["sub"], limit=N)
    assert answers(a[GEN]) != answers(alone[GEN])
    cached_tokens.clear()
    b = swapped.evaluate(models["rev"], limit=N)
    assert sum(cached_tokens) >= 32 * (N - 1)  # every generation prompt but the first read a cached block
    assert answers(b[GEN]) == answers(alone[GEN])
    assert b[GEN].metrics == alone[GEN].metrics
    assert lls(b[LL]) == lls(alone[LL])  # vLLM reads no cache for prompt log-probabilities
    assert b[LL].metrics == alone[LL].metrics


def test_without_the_reset_the_next_candidate_reads_the_previous_ones_blocks(engines, models, cached_tokens,
                                                                            monkeypatch):
    """The reset is what the test above relies on: with it taken out, B's prompts are served the
    shared block that A computed, and some of B's answers are no longer its own."""
    import evomerge.evaluation.vllm_engine as vllm_engine

    swapped, fresh = engines
    alone = answers(fresh.evaluate(None, limit=N)[GEN])
    swapped.evaluate(models["sub"], limit=N)  # reset at this swap: A computes the shared block
    monkeypatch.setattr(vllm_engine, "reset_prefix_cache", lambda lm: None)
    cached_tokens.clear()
    got = answers(swapped.evaluate(models["rev"], limit=N)[GEN])
    assert sum(cached_tokens) == 32 * N  # every prompt read the block A's evaluation cached
    assert got != alone
