"""CMA-ES from pycma, in the unit cube, with its own random stream.

Options (docs/search.md, "CMA-ES options"):

- ``separable``: pycma's ``CMA_diagonal`` (sep-CMA: a diagonal covariance, whose learning rates
  are about n/3 times higher, so it adapts within a short budget in high dimension); ``"auto"``
  picks it when the genome has more than ``AUTO_SEPARABLE_DIM`` genes.
- ``bounds``: pycma's ``BoundTransform`` (``transform``: the sampling space mapped smoothly into
  the cube, genomes strictly inside) or ``BoundPenalty`` (``penalty``: a sample outside the cube
  is clipped onto it, and pycma adds a penalty growing with the distance to its told fitness).
- ``restarts``: IPOP or BIPOP (pycma's ``cma.fmin`` rules, with this optimizer's own stream for
  the random draws): when the running strategy stops (pycma's ``stop()``, with the given
  ``tolfun``/``tolx``, or ``patience`` generations without a better fitness in the current run),
  a new strategy starts at a uniform random point of the cube (or at the start point) with a larger
  population. The population size changes across generations: ``popsize`` is always the current one.
- ``seeds``: a seed population (``start: best_plain``): the first generation asks these genomes;
  CMA-ES then starts at the best of them.

Everything is a deterministic function of the seed and the told history, so a resumed search
replays restarts exactly.
"""

from __future__ import annotations

import cma
import numpy as np

from evomerge.search.optimizers.base import Optimizer
from evomerge.search.optimizers.cma_options import AUTO_SEPARABLE_DIM, Restarts

__all__ = ["AUTO_SEPARABLE_DIM", "CMAES", "Restarts", "plain_merge_genomes"]


class CMAES(Optimizer):
    name = "cma"

    def __init__(self, x0, sigma0: float = 1 / 6, popsize: int | None = None, seed: int = 0,
                 separable: bool | str = False, bounds: str = "transform", restarts: Restarts | None = None,
                 seeds: np.ndarray | None = None):
        super().__init__(x0, sigma0, popsize, seed)
        if bounds not in ("transform", "penalty"):
            raise ValueError(f"bounds must be transform or penalty (got {bounds!r})")
        if restarts is not None and restarts.kind not in ("ipop", "bipop"):
            raise ValueError(f"restarts.kind must be ipop or bipop (got {restarts.kind!r})")
        self.separable = self.dim > AUTO_SEPARABLE_DIM if separable == "auto" else bool(separable)
        self.bounds = bounds
        self.restarts = restarts
        self.popsize0 = self.popsize
        # one entry per strategy run: where and how it started, its evaluations, why it stopped
        self.runs: list[dict] = []
        self._small: list[int] = []  # BIPOP: evaluations of the small-population runs (run 0 included)
        self._large: list[int] = []
        self._with_small = 0
        self._maxiter0: float | None = None
        self._restarts_left = restarts is not None
        self.es: cma.CMAEvolutionStrategy | None = None
        self.seeds = None if seeds is None else np.asarray(seeds, dtype=np.float64)
        if self.seeds is not None:
            if self.seeds.ndim != 2 or self.seeds.shape[1] != self.dim or len(self.seeds) < 1:
                raise ValueError(f"seeds must be an array [n, {self.dim}]")
            if np.any(self.seeds < 0) or np.any(self.seeds > 1):
                raise ValueError("seed genomes must lie in the unit cube")
            self.popsize = len(self.seeds)  # the seed generation's size
            self.start_point: list[float] | None = None
        else:
            self._new_run(self.x0, self.sigma0, self.popsize0, "small")
        self._asked: list[np.ndarray] | None = None

    # ------------------------------------------------------------------ strategy runs
    def _new_run(self, x0: np.ndarray, sigma0: float, popsize: int, regime: str, maxiter: float | None = None) -> None:
        opts = {
            "popsize": popsize,
            "bounds": [0.0, 1.0],
            "BoundaryHandler": cma.BoundTransform if self.bounds == "transform" else cma.BoundPenalty,
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            # pycma draws from NumPy's global generator unless given its own randn.
            "randn": lambda *shape: self.rng.standard_normal(shape),
            "seed": np.nan,  # never reseed the global generator
            "CMA_diagonal": self.separable,
        }
        if self.restarts is not None:
            opts.update({k: v for k, v in (("tolfun", self.restarts.tolfun), ("tolx", self.restarts.tolx))
                         if v is not None})
        if maxiter is not None:
            opts["maxiter"] = maxiter
        self.es = cma.CMAEvolutionStrategy(np.asarray(x0, dtype=np.float64), sigma0, opts)
        if self._maxiter0 is None:
            self._maxiter0 = float(self.es.opts["maxiter"])
        self.popsize = popsize
        self.runs.append({"generation": self.generation, "popsize": popsize, "regime": regime,
                          "sigma0": float(sigma0), "x0": [float(v) for v in x0], "evaluations": 0,
                          "best": None, "since_best": 0, "stop": None})

    def _stopped(self) -> list[str]:
        """Why the current run stops (empty: it goes on)."""
        run = self.runs[-1]
        why = [k for k in self.es.stop()]
        p = self.restarts.patience
        if p is not None and run["since_best"] >= p:
            why.append("patience")
        return why

    def _restart(self, why: list[str]) -> bool:
        """pycma's fmin restart rules (IPOP, or BIPOP with bipop=1); False when none is left."""
        r = self.restarts
        run = self.runs[-1]
        run["stop"] = sorted(why)
        (self._small if run["regime"] == "small" else self._large).append(run["evaluations"])
        irun = len(self.runs)  # the index of the run to start
        if irun - self._with_small > r.max:
            return False
        x0 = self.rng.random(self.dim) if r.start == "random" else self.x0_run
        sigma, maxiter, regime = self.sigma0, None, "large"
        if r.kind == "ipop":
            popsize = round(self.popsize0 * r.incpopsize ** irun)
        elif sum(self._small) < max(1, sum(self._large)):
            regime = "small"
            self._with_small += 1
            sigma = self.sigma0 * 0.01 ** self.rng.random()  # a local search
            popsize = int(self.popsize0 * (r.incpopsize ** (irun - self._with_small)) ** (self.rng.random() ** 2))
            maxiter = min(self._maxiter0, 0.5 * sum(self._large) / popsize)
        else:
            popsize = round(self.popsize0 * r.incpopsize ** (irun - self._with_small))
            maxiter = self._maxiter0
        self._new_run(x0, sigma, max(2, popsize), regime, maxiter)
        return True

    @property
    def x0_run(self) -> np.ndarray:
        """Where the first run started (the space's start, or the best seed)."""
        return np.asarray(self.runs[0]["x0"], dtype=np.float64)

    # ------------------------------------------------------------------ ask / tell
    def ask(self) -> np.ndarray:
        if self.es is None:
            self._asked = list(self.seeds)
            return self.seeds.copy()
        self._asked = self.es.ask()  # in the cube with either bound handler (BoundPenalty clips)
        return np.array(self._asked, dtype=np.float64)

    def tell(self, genomes: np.ndarray, fitness: np.ndarray) -> None:
        fitness = self._check_tell(genomes, fitness, self.popsize)
        if self._asked is None:
            raise RuntimeError("tell() without ask()")
        asked, self._asked = self._asked, None
        self.generation += 1
        if self.es is None:  # the seed generation: CMA-ES starts at the best seed (the first on ties)
            best = self.seeds[int(np.argmax(fitness))]
            self.start_point = [float(v) for v in best]
            self._new_run(best, self.sigma0, self.popsize0, "small")
            return
        self.es.tell(asked, list(-fitness))  # pycma minimizes
        run = self.runs[-1]
        run["evaluations"] += len(asked)
        top = float(np.max(fitness))
        if run["best"] is None or top > run["best"]:
            run["best"], run["since_best"] = top, 0
        else:
            run["since_best"] += 1
        if self._restarts_left and (why := self._stopped()):
            # no restart left: the stopped strategy goes on sampling (pycma allows it) to the budget
            self._restarts_left = self._restart(why)

    def state_dict(self) -> dict:
        state = super().state_dict() | {
            "separable": self.separable,
            "bounds": self.bounds,
            "runs": self.runs,
            "restarts": None if self.restarts is None else {"kind": self.restarts.kind, "max": self.restarts.max,
                                                            "done": max(0, len(self.runs) - 1)},
        }
        if self.seeds is not None:
            state["seeds"] = len(self.seeds)
            state["start_point"] = self.start_point
        if self.es is not None:
            state |= {"mean": [float(v) for v in self.es.mean], "sigma": float(self.es.sigma),
                      "countevals": int(self.es.countevals)}
        return state


def plain_merge_genomes(x0: np.ndarray, per_model: np.ndarray, levels) -> np.ndarray:
    """The seed population of ``start: best_plain``: ``x0`` first, then for each level the genome
    whose per-model genes (``per_model``: a weight, a density... of each source model in each layer
    group) all sit at that position of the cube, the method-wide genes staying at ``x0``; genomes
    equal to an earlier one are left out."""
    x0 = np.asarray(x0, dtype=np.float64)
    per_model = np.asarray(per_model, dtype=bool)
    if per_model.shape != x0.shape or not per_model.any():
        raise ValueError("best_plain needs per-model genes (a mask of the genome's shape with at least one)")
    out = [x0]
    for level in levels:
        g = x0.copy()
        g[per_model] = float(level)
        if not any(np.array_equal(g, o) for o in out):
            out.append(g)
    return np.array(out)
