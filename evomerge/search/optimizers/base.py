"""The optimizer interface: generation-synchronous ask/tell over genomes in the unit cube.

Genomes live in [0, 1]^n (the codec maps them to merge parameters), so optimizers never branch on
parameter types. Fitness is maximized. Every optimizer owns its random stream (seeded, never a
global one) and is a deterministic function of its seed and the (genomes, fitness) history it is
told: a resumed search rebuilds it by replaying the run log, and checks that each replayed ``ask``
returns the logged genomes bit for bit. ``state_dict`` is a JSON snapshot written to the run folder
after each generation (for inspection and for that check); it is not a pickle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Optimizer(ABC):
    name: str = "?"
    n_objectives: int = 1  # > 1: tell() takes an array [popsize, n_objectives], each maximized

    def __init__(self, x0: np.ndarray, sigma0: float, popsize: int | None, seed: int):
        x0 = np.asarray(x0, dtype=np.float64)
        if x0.ndim != 1 or x0.size == 0:
            raise ValueError("the starting point must be a non-empty vector")
        if np.any(x0 < 0) or np.any(x0 > 1):
            raise ValueError("the starting point must lie in [0, 1]^n (the codec's unit cube)")
        if not sigma0 > 0:
            raise ValueError(f"sigma0 must be > 0 (got {sigma0})")
        self.dim = x0.size
        self.x0 = x0
        self.sigma0 = float(sigma0)
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        self.popsize = int(popsize) if popsize else self.default_popsize(self.dim)
        if self.popsize < 2:
            raise ValueError(f"popsize must be >= 2 (got {self.popsize})")
        self.generation = 0

    @staticmethod
    def default_popsize(dim: int) -> int:
        return 4 + int(3 * np.log(dim))  # pycma's default

    @abstractmethod
    def ask(self) -> np.ndarray:
        """The next generation: an array [popsize, dim] inside the unit cube."""

    @abstractmethod
    def tell(self, genomes: np.ndarray, fitness: np.ndarray) -> None:
        """Fitness of every genome of the last ``ask`` (higher is better)."""

    def state_dict(self) -> dict:
        return {"version": 1, "optimizer": self.name, "generation": self.generation, "seed": self.seed,
                "popsize": self.popsize, "rng": self.rng.bit_generator.state}

    @staticmethod
    def _check_tell(genomes: np.ndarray, fitness: np.ndarray, popsize: int, n_objectives: int = 1) -> np.ndarray:
        fitness = np.asarray(fitness, dtype=np.float64)
        shape = (popsize,) if n_objectives == 1 else (popsize, n_objectives)
        if len(genomes) != popsize or fitness.shape != shape:
            raise ValueError(f"tell needs {popsize} genomes and fitness values (got {len(genomes)}, {fitness.shape})")
        if not np.all(np.isfinite(fitness)):
            raise ValueError("tell got non-finite fitness; the driver gives failed candidates a penalty fitness")
        return fitness
