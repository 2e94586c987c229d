"""Optuna samplers behind the ask/tell interface (CmaEsSampler, TPESampler, or any other
single-objective sampler by class name), on an in-memory study.

Generation-synchronous: a generation asks ``popsize`` trials, then tells them all. The sampler is
seeded (its own RandomState), so, like every evomerge optimizer, it is a deterministic function of
its seed and the history it is told, and a resumed search rebuilds it by replaying the run log.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import numpy as np

from evomerge.search.optimizers.base import Optimizer


def sampler_class(name: str, multi_objective: bool = False):
    import optuna

    cls = getattr(optuna.samplers, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, optuna.samplers.BaseSampler)):
        known = sorted(n for n in dir(optuna.samplers) if n.endswith("Sampler") and n != "BaseSampler")
        raise ValueError(f"unknown Optuna sampler {name!r}; choose one of {', '.join(known)}")
    if multi_objective:
        return cls
    if name in ("NSGAIISampler", "NSGAIIISampler", "GridSampler", "PartialFixedSampler", "BruteForceSampler"):
        raise ValueError(f"{name} is not a single-objective sampler over a continuous space; "
                         "use CmaEsSampler, TPESampler, RandomSampler, QMCSampler or GPSampler")
    return cls


class OptunaOptimizer(Optimizer):
    name = "optuna"

    def __init__(self, x0, sigma0: float, popsize: int | None, seed: int, sampler: str = "CmaEsSampler",
                 sampler_args: dict[str, Any] | None = None, n_objectives: int = 1):
        super().__init__(x0, sigma0, popsize, seed)
        self.n_objectives = int(n_objectives)
        import optuna
        from optuna.distributions import FloatDistribution

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        cls = sampler_class(sampler, multi_objective=self.n_objectives > 1)
        kwargs = dict(sampler_args or {})
        params = inspect.signature(cls).parameters
        if "seed" in params:
            kwargs.setdefault("seed", self.seed)
        self.names = [f"x{i:04d}" for i in range(self.dim)]
        if sampler == "CmaEsSampler":
            kwargs.setdefault("x0", dict(zip(self.names, map(float, self.x0), strict=True)))
            kwargs.setdefault("sigma0", self.sigma0)
            kwargs.setdefault("popsize", self.popsize)
        if sampler == "NSGAIISampler":
            # One Optuna generation is one evomerge generation (ask popsize, tell popsize).
            kwargs.setdefault("population_size", self.popsize)
        self.sampler_name = sampler
        with warnings.catch_warnings():
            # Optuna 5 deprecates CmaEsSampler's x0/sigma0 (removal planned for 6.0); they still set
            # the starting point, which evomerge's search spaces define.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study = optuna.create_study(directions=["maximize"] * self.n_objectives, sampler=cls(**kwargs))
        self.dists = {n: FloatDistribution(0.0, 1.0) for n in self.names}
        self._trials: list = []
        if sampler == "NSGAIISampler":
            # NSGA-II's first generation is uniform random: the space's starting point joins it, so
            # the front starts no worse than the recipe the space was built around.
            self.study.enqueue_trial(dict(zip(self.names, map(float, self.x0), strict=True)))

    def ask(self) -> np.ndarray:
        self._trials = [self.study.ask(self.dists) for _ in range(self.popsize)]
        return np.array([[t.params[n] for n in self.names] for t in self._trials], dtype=np.float64)

    def tell(self, genomes: np.ndarray, fitness: np.ndarray) -> None:
        fitness = self._check_tell(genomes, fitness, self.popsize, self.n_objectives)
        if not self._trials:
            raise RuntimeError("tell() without ask()")
        for trial, f in zip(self._trials, fitness, strict=True):
            self.study.tell(trial, float(f) if self.n_objectives == 1 else [float(v) for v in f])
        self._trials = []
        self.generation += 1

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.pop("rng")  # the sampler owns its stream
        if self.n_objectives > 1:
            return state | {"sampler": self.sampler_name, "trials": len(self.study.trials),
                            "objectives": self.n_objectives, "pareto_trials": len(self.study.best_trials)}
        best = self.study.best_trial if self.study.trials else None
        return state | {"sampler": self.sampler_name, "trials": len(self.study.trials),
                        "best_value": best.value if best else None}
