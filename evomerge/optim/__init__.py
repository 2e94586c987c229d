"""Optimizers behind one ask/tell interface; ``make_optimizer`` picks one by name."""

from __future__ import annotations

from evomerge.optim.base import Optimizer

OPTIMIZERS = ("cma", "random", "optuna")


def make_optimizer(name: str, x0, sigma0: float, popsize: int | None, seed: int,
                   sampler: str = "CmaEsSampler", sampler_args: dict | None = None) -> Optimizer:
    """``cma`` (pycma), ``random``, or ``optuna`` with an Optuna sampler named by its class."""
    if name == "cma":
        from evomerge.optim.cma import CMAES

        return CMAES(x0, sigma0, popsize, seed)
    if name == "random":
        from evomerge.optim.random_search import RandomSearch

        return RandomSearch(x0, sigma0, popsize, seed)
    if name == "optuna":
        from evomerge.optim.optuna import OptunaOptimizer

        return OptunaOptimizer(x0, sigma0, popsize, seed, sampler=sampler, sampler_args=sampler_args)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


__all__ = ["OPTIMIZERS", "Optimizer", "make_optimizer"]
