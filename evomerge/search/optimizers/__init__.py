"""Optimizers behind one ask/tell interface, and their registry: what each one declares.

The registry is the one place an optimizer is named: the config's choices, the CLI's and the
loop's decisions (objectives, batch rule) come from its `OptimizerKind` entries; nothing else
tests an optimizer's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from evomerge.search.optimizers.base import Optimizer


class Batch(StrEnum):
    """How an optimizer takes its candidates (search.loop.Search decides the batches from it)."""

    GENERATION = "generation"  # asks a whole population, is told all of it, asks the next
    STEADY = "steady"  # asks one candidate at a time and is told each result (in log order)


@dataclass(frozen=True)
class OptimizerKind:
    name: str
    batch: Batch = Batch.GENERATION
    multi_objective: bool = False  # told one maximized value per task metric (the tasks are the objectives)
    options: str = ""  # which config options apply: "cma" (cma_options, start), "optuna" (sampler), "m2n2"
    # told each candidate's per-item scores (tell_items) on one fixed item subset: M2N2's resources
    per_item: bool = False


REGISTRY: dict[str, OptimizerKind] = {k.name: k for k in (
    OptimizerKind("cma", options="cma"),
    OptimizerKind("random"),
    OptimizerKind("random_steady", batch=Batch.STEADY),
    OptimizerKind("m2n2", batch=Batch.STEADY, options="m2n2", per_item=True),
    OptimizerKind("optuna", options="optuna"),
    OptimizerKind("nsga2", multi_objective=True, options="optuna"),
)}
OPTIMIZERS = tuple(REGISTRY)


def kind(name: str) -> OptimizerKind:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}") from None


def make_optimizer(name: str, x0, sigma0: float, popsize: int | None, seed: int,
                   sampler: str = "CmaEsSampler", sampler_args: dict | None = None, n_objectives: int = 1,
                   cma_options: dict | None = None, m2n2: dict | None = None) -> Optimizer:
    """``cma`` (pycma; ``cma_options``: the keyword options of ``optimizers.cma.CMAES``), ``random``,
    ``random_steady`` (one candidate at a time), ``m2n2`` (``m2n2``: the keyword options of
    ``optimizers.m2n2.M2N2``), ``optuna`` with an Optuna sampler named by its class, or ``nsga2``
    (Optuna's NSGAIISampler, ``n_objectives`` maximized objectives)."""
    k = kind(name)
    if k.name == "m2n2":
        from evomerge.search.optimizers.m2n2 import M2N2

        return M2N2(x0, sigma0, popsize, seed, **(m2n2 or {}))
    if k.name == "cma":
        from evomerge.search.optimizers.cma import CMAES

        return CMAES(x0, sigma0, popsize, seed, **(cma_options or {}))
    if k.name == "random":
        from evomerge.search.optimizers.random_search import RandomSearch

        return RandomSearch(x0, sigma0, popsize, seed)
    if k.name == "random_steady":
        from evomerge.search.optimizers.random_search import SteadyRandomSearch

        return SteadyRandomSearch(x0, sigma0, popsize, seed)
    from evomerge.search.optimizers.optuna import OptunaOptimizer

    if k.multi_objective:
        return OptunaOptimizer(x0, sigma0, popsize, seed, sampler="NSGAIISampler", sampler_args=sampler_args,
                               n_objectives=n_objectives)
    return OptunaOptimizer(x0, sigma0, popsize, seed, sampler=sampler, sampler_args=sampler_args)


def optimizer_options(o, n_tasks: int, x0, per_model, codec=None) -> dict:
    """``make_optimizer``'s keyword options for an `OptimizerConfig` ``o``: the objectives of a
    multi-objective optimizer, the sampler of an Optuna one, CMA-ES's options and (``start:
    best_plain``) its seed population of plain merges around ``x0`` (``per_model()``: the genome's
    per-model gene mask), M2N2's options, its genes' places along the parameter order and its seed
    genomes (from the parameter-space ``codec``)."""
    k = kind(o.name)
    kw: dict = {}
    if k.options == "m2n2":
        from evomerge.search.optimizers.m2n2 import seed_genomes

        opts = o.m2n2_options
        kw["m2n2"] = {"options": opts, "positions": codec.positions(), "seeds": seed_genomes(codec, opts.seeds)}
    if k.multi_objective:
        kw["n_objectives"] = n_tasks
    if k.options == "optuna":
        kw["sampler"], kw["sampler_args"] = o.sampler, o.sampler_args
    if k.options == "cma":
        kw["cma_options"] = o.cma_options()
        if o.start == "best_plain":  # generation 0 is the seed population of plain merges
            # imported here: pycma costs about 0.7 s of start-up that other optimizers need not pay
            from evomerge.search.optimizers.cma import plain_merge_genomes

            kw["cma_options"]["seeds"] = plain_merge_genomes(x0, per_model(), o.plain_levels)
    return kw


__all__ = ["OPTIMIZERS", "REGISTRY", "Batch", "Optimizer", "OptimizerKind", "kind", "make_optimizer",
           "optimizer_options"]
