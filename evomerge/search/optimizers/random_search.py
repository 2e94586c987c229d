"""Random search: uniform genomes in the unit cube. The baseline every result is compared to."""

from __future__ import annotations

import numpy as np

from evomerge.search.optimizers.base import Optimizer


class RandomSearch(Optimizer):
    name = "random"

    def ask(self) -> np.ndarray:
        return self.rng.random((self.popsize, self.dim))

    def tell(self, genomes: np.ndarray, fitness: np.ndarray) -> None:
        self._check_tell(genomes, fitness, self.popsize)
        self.generation += 1


class SteadyRandomSearch(Optimizer):
    """Random search one candidate at a time (a steady-state optimizer, search/optimizers/base.py):
    ``ask(1)`` draws the next genome, ``tell`` takes each result. The draws are the generational
    `RandomSearch`'s, row by row, so both sample the same genomes for a seed."""

    name = "random_steady"

    @property
    def pending(self) -> int:
        """Candidates asked ahead of the results they wait for (search/steady.py): its draws do
        not depend on the results, so as many as a population."""
        return self.popsize

    def ask(self, n: int | None = None) -> np.ndarray:
        return self.rng.random((n or self.popsize, self.dim))

    def tell(self, genomes: np.ndarray, fitness: np.ndarray) -> None:
        fitness = np.asarray(fitness, dtype=np.float64)
        if len(genomes) != len(fitness) or not np.all(np.isfinite(fitness)):
            raise ValueError("tell needs one finite fitness per genome")
        self.told = getattr(self, "told", 0) + len(genomes)
        self.generation = self.told // self.popsize
