"""Optimizers behind one ask/tell interface; ``make_optimizer`` picks one by name."""

from __future__ import annotations

from evomerge.optim.base import Optimizer

OPTIMIZERS = ("cma", "random")


def make_optimizer(name: str, x0, sigma0: float, popsize: int | None, seed: int) -> Optimizer:
    if name == "cma":
        from evomerge.optim.cma import CMAES

        return CMAES(x0, sigma0, popsize, seed)
    if name == "random":
        from evomerge.optim.random_search import RandomSearch

        return RandomSearch(x0, sigma0, popsize, seed)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


__all__ = ["OPTIMIZERS", "Optimizer", "make_optimizer"]
