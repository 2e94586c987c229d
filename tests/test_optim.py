"""Optimizers: seeded, own random streams, JSON state, replayable."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from evomerge.search.optimizers import make_optimizer


def sphere(x: np.ndarray) -> np.ndarray:
    return -((x - 0.7) ** 2).sum(axis=1)


@pytest.mark.parametrize("name", ["cma", "random"])
def test_same_seed_same_genomes_and_cube(name):
    a, b = (make_optimizer(name, np.full(6, 0.5), 0.2, 8, seed=3) for _ in range(2))
    for _ in range(4):
        xa, xb = a.ask(), b.ask()
        assert xa.shape == (8, 6) and np.array_equal(xa, xb)
        assert xa.min() >= 0 and xa.max() <= 1
        a.tell(xa, sphere(xa)), b.tell(xb, sphere(xb))
    json.dumps(a.state_dict())  # JSON-able snapshot
    c = make_optimizer(name, np.full(6, 0.5), 0.2, 8, seed=4)
    assert not np.array_equal(c.ask(), make_optimizer(name, np.full(6, 0.5), 0.2, 8, seed=3).ask())


def test_cma_improves_on_a_sphere():
    opt = make_optimizer("cma", np.full(5, 0.2), 0.2, None, seed=0)
    assert opt.popsize == 4 + int(3 * np.log(5))
    best = -np.inf
    for _ in range(60):
        x = opt.ask()
        f = sphere(x)
        best = max(best, f.max())
        opt.tell(x, f)
    assert best > -1e-3


def test_an_evaluation_between_two_asks_changes_nothing(zoo_dir):
    """lm-eval reseeds global generators in simple_evaluate; our evaluator and optimizers use neither."""
    from evomerge.evaluation.evaluator import LmEvalEvaluator
    from evomerge.models.folders import load_causal_lm, load_tokenizer

    ev = LmEvalEvaluator(["zoo_add"], split="dev", batch_size=16)
    model, tok = load_causal_lm(zoo_dir / "base"), load_tokenizer(zoo_dir / "base")

    def two_asks(evaluate_between: bool) -> np.ndarray:
        opt = make_optimizer("cma", np.full(4, 0.5), 0.2, 6, seed=11)
        x = opt.ask()
        opt.tell(x, sphere(x))
        if evaluate_between:
            ev.evaluate(model, tok, limit=10)
            random.seed(1), np.random.seed(1), torch.manual_seed(1)  # global streams, disturbed on purpose
        return opt.ask()

    assert np.array_equal(two_asks(False), two_asks(True))


def test_tell_validates():
    opt = make_optimizer("cma", np.full(3, 0.5), 0.2, 4, seed=0)
    x = opt.ask()
    with pytest.raises(ValueError, match="non-finite"):
        opt.tell(x, np.array([1.0, np.nan, 0.0, 0.0]))
    with pytest.raises(ValueError, match="needs 4"):
        opt.tell(x[:2], np.zeros(2))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown optimizer 'cmaes'"):
        make_optimizer("cmaes", np.full(3, 0.5), 0.2, 4, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        make_optimizer("cma", np.full(3, 1.5), 0.2, 4, seed=0)


def test_nsga2_first_generation_holds_the_starting_point():
    x0 = np.array([0.3, 0.7, 0.5])
    opt = make_optimizer("nsga2", x0, 0.2, 6, seed=3, n_objectives=2)
    first = opt.ask()
    assert np.array_equal(first[0], x0)
    assert not any(np.array_equal(row, x0) for row in first[1:])
    opt.tell(first, np.zeros((6, 2)))
    assert not any(np.array_equal(row, x0) for row in opt.ask())
