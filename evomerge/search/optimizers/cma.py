"""CMA-ES from pycma, in the unit cube, with its own random stream."""

from __future__ import annotations

import cma
import numpy as np

from evomerge.search.optimizers.base import Optimizer


class CMAES(Optimizer):
    name = "cma"

    def __init__(self, x0, sigma0: float = 1 / 6, popsize: int | None = None, seed: int = 0):
        super().__init__(x0, sigma0, popsize, seed)
        opts = {
            "popsize": self.popsize,
            "bounds": [0.0, 1.0],  # pycma's BoundTransform keeps every genome in the cube
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            # pycma draws from NumPy's global generator unless given its own randn.
            "randn": lambda *shape: self.rng.standard_normal(shape),
            "seed": np.nan,  # never reseed the global generator
            "CMA_diagonal": False,
        }
        self.es = cma.CMAEvolutionStrategy(self.x0, self.sigma0, opts)
        self._asked: list[np.ndarray] | None = None

    def ask(self) -> np.ndarray:
        self._asked = self.es.ask()
        return np.array(self._asked, dtype=np.float64)

    def tell(self, genomes: np.ndarray, fitness: np.ndarray) -> None:
        fitness = self._check_tell(genomes, fitness, self.popsize)
        if self._asked is None:
            raise RuntimeError("tell() without ask()")
        self.es.tell(self._asked, list(-fitness))  # pycma minimizes
        self._asked = None
        self.generation += 1

    def state_dict(self) -> dict:
        return super().state_dict() | {
            "mean": [float(v) for v in self.es.mean],
            "sigma": float(self.es.sigma),
            "countevals": int(self.es.countevals),
        }
