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
