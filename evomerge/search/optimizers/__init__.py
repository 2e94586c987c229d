"""Optimizers behind one ask/tell interface; ``make_optimizer`` picks one by name."""

from __future__ import annotations

from evomerge.search.optimizers.base import Optimizer

OPTIMIZERS = ("cma", "random", "optuna", "nsga2")


def make_optimizer(name: str, x0, sigma0: float, popsize: int | None, seed: int,
                   sampler: str = "CmaEsSampler", sampler_args: dict | None = None, n_objectives: int = 1,
                   cma_options: dict | None = None) -> Optimizer:
    """``cma`` (pycma; ``cma_options``: the keyword options of ``optimizers.cma.CMAES``), ``random``,
    ``optuna`` with an Optuna sampler named by its class, or ``nsga2`` (Optuna's NSGAIISampler,
    ``n_objectives`` maximized objectives)."""
    if name == "cma":
        from evomerge.search.optimizers.cma import CMAES

        return CMAES(x0, sigma0, popsize, seed, **(cma_options or {}))
    if name == "random":
        from evomerge.search.optimizers.random_search import RandomSearch

        return RandomSearch(x0, sigma0, popsize, seed)
    if name == "optuna":
        from evomerge.search.optimizers.optuna import OptunaOptimizer

        return OptunaOptimizer(x0, sigma0, popsize, seed, sampler=sampler, sampler_args=sampler_args)
    if name == "nsga2":
        from evomerge.search.optimizers.optuna import OptunaOptimizer

        return OptunaOptimizer(x0, sigma0, popsize, seed, sampler="NSGAIISampler", sampler_args=sampler_args,
                               n_objectives=n_objectives)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


__all__ = ["OPTIMIZERS", "Optimizer", "make_optimizer"]
