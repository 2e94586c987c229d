"""M2N2, Model Merging of Natural Niches (Abrantes, Lange, Tang: "Competition and Attraction
Improve Model Fusion", GECCO 2025, arXiv 2508.16204), as a steady-state optimizer over genomes.

An archive of genomes (recipes over the sources, never stored models) evolves one child at a time:

- **resources**: every item of the fitness tasks is a resource of capacity c_j (its task's weight
  over its item count, so sum_j c_j s_j is the weighted fitness). The archive shares it: a member
  earns s_ij c_j / z_j^alpha, z_j the archive's total score on item j, so an item few members
  solve is worth more to the one that solves it (alpha = 0: no competition, a plain GA);
- **selection**: the first parent with probability proportional to that shared fitness; the
  second by **attraction**: proportional to sum_j c_j / z_j^alpha * max(s_Bj - s_Aj, 0), what B
  solves that A does not;
- **crossover**: a split point along the model's parameter order (the codec's gene positions:
  tensor by tensor with ``granularity.tensors``) and a mixing ratio w: the genes before the split
  take (1 - w) A + w B, the others w A + (1 - w) B. Genes map linearly onto coefficients, so the
  child is a recipe with piecewise coefficients; for a method linear in its weights (linear,
  task_arithmetic) it is exactly that piecewise mix of the two merged models;
- **survival**: the child joins the archive, and the member with the lowest shared fitness (the
  child included) leaves once the archive is full.

The first asks are the seed genomes (the sources alone, the space's start); every later one is a
crossover. A deterministic function of the seed and of the per-item scores it is told, in order
(search/steady.py tells them in log order), so a resume replays it exactly.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from evomerge.search.optimizers.base import Optimizer
from evomerge.search.optimizers.cma_options import PLAIN_LEVELS


class M2N2Options(BaseModel):
    """``optimizer: {name: m2n2, m2n2: {...}}``: the paper's defaults (its public code's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    archive_size: int = Field(20, ge=2, le=1000, description="members kept (the paper: 20)")
    alpha: float = Field(1.0, ge=0, le=10, allow_inf_nan=False,
                         description="resource competition: an item's reward is c_j / z_j^alpha (0: none)")
    attraction: bool = Field(True, description="the second parent by attraction (false: like the first)")
    split_point: bool = Field(True, description="a random split point per crossover (false: one ratio for all)")
    seeds: tuple[Literal["sources", "start", "plain"], ...] = Field(
        ("sources",), min_length=1, description="the first candidates: each source alone (its weight 1, "
        "the others' 0), the space's start, plain merges (every per-model gene at 0.1, 0.3, ..., 0.9)")
    in_flight: int = Field(2, ge=1, le=64, description="candidates asked before the results they could "
                           "see (the paper: 1); at least the workers, to keep them all busy")

    def check(self, space, n_models: int, task_weights: list[float]) -> None:
        """Refusals that need the search space and the tasks (the config's validation)."""
        from evomerge.search.spaces.parameter import SearchSpace

        if not isinstance(space, SearchSpace):
            raise ValueError("optimizer.name: m2n2 crosses per-model coefficients; a data-flow space has none")
        if "sources" in self.seeds and "weight" not in space.parameters:
            raise ValueError(f"optimizer.m2n2.seeds: sources sets each source's weight alone, and the "
                             f"space ({space.method}) searches no per-model weight; use seeds: [start] or "
                             "another space")
        n_seeds = ("sources" in self.seeds) * n_models + ("start" in self.seeds) + ("plain" in self.seeds) * 5
        if n_seeds < 2:
            raise ValueError(f"optimizer.m2n2.seeds: {list(self.seeds)} gives {n_seeds} seed genome; a "
                             "crossover needs two (add sources or start)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("optimizer.m2n2.seeds: a seed kind is listed twice")
        bad = [i for i, w in enumerate(task_weights) if w < 0]
        if bad:
            raise ValueError(f"tasks.{bad[0]}.weight: m2n2 shares each item's reward among the archive; "
                             "a negative weight is no resource")


def seed_genomes(codec, kinds) -> np.ndarray:
    """The seed genomes in ``kinds``' order: ``sources``, each source model alone (its per-model
    ``weight`` genes at 1, every other source's at 0, clipped to the genes' ranges; the other genes
    at the start), ``start``, the space's start ``codec.x0``, and ``plain``, the plain merges of
    CMA-ES's ``start: best_plain`` (every per-model gene at one of ``PLAIN_LEVELS``, the others at
    the start). Repeats are left out."""
    out: list[np.ndarray] = []
    per_model = np.array([g.model is not None for g in codec.genes])
    for kind in kinds:
        if kind == "start":
            out.append(codec.x0.copy())
            continue
        if kind == "plain":
            for level in PLAIN_LEVELS:
                g = codec.x0.copy()
                g[per_model] = level
                out.append(g)
            continue
        for m in codec.models:
            g = codec.x0.copy()
            for i, gene in enumerate(codec.genes):
                if gene.param == "weight" and gene.model is not None:
                    g[i] = min(max(gene.position(1.0 if gene.model == m else 0.0), 0.0), 1.0)
            out.append(g)
    unique: list[np.ndarray] = []
    for g in out:
        if not any(np.array_equal(g, u) for u in unique):
            unique.append(g)
    return np.array(unique)


def shared_fitness(scores: np.ndarray, capacity: np.ndarray, alpha: float) -> np.ndarray:
    """Each row's resource-shared fitness, sum_j s_ij c_j / z_j^alpha (an item no row solves
    rewards nobody), and the per-item rewards c_j / z_j^alpha as the second value."""
    z = scores.sum(axis=0)
    reward = np.where(z > 0, capacity / np.where(z > 0, z, 1.0) ** alpha, 0.0)
    return scores @ reward, reward


def crossover(a: np.ndarray, b: np.ndarray, positions: np.ndarray, split: int, w: float) -> np.ndarray:
    """Genes at positions before ``split`` take (1 - w) a + w b, the others w a + (1 - w) b."""
    t = np.where(positions < split, w, 1.0 - w)
    return np.clip((1.0 - t) * a + t * b, 0.0, 1.0)


class M2N2(Optimizer):
    name = "m2n2"

    def __init__(self, x0, sigma0: float, popsize: int | None, seed: int, *, positions, seeds,
                 options: M2N2Options | None = None):
        super().__init__(x0, sigma0, popsize, seed)
        self.opt = options or M2N2Options()
        self.positions = np.asarray(positions, dtype=np.int64)
        if self.positions.shape != (self.dim,):
            raise ValueError(f"positions: one per gene ({self.dim}), got {self.positions.shape}")
        self.n_positions = int(self.positions.max()) + 1
        self.seeds = np.asarray(seeds, dtype=np.float64).reshape(-1, self.dim)
        if len(self.seeds) < 2:
            raise ValueError("m2n2 needs two seed genomes at least")
        self.archive: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []  # per-item scores of each member
        self.capacity: np.ndarray | None = None
        self.asked = 0
        self.told = 0
        self.parents: list[tuple[int, int]] = []  # archive slots of the last asks' parents, for the state

    @property
    def pending(self) -> int:
        """Candidates asked before the results they could see (search/steady.py)."""
        return self.opt.in_flight

    # ------------------------------------------------------------------ ask
    def ask(self, n: int | None = None) -> np.ndarray:
        return np.array([self._ask_one() for _ in range(n or 1)])

    def _ask_one(self) -> np.ndarray:
        k = self.asked
        self.asked += 1
        if k < len(self.seeds):
            return self.seeds[k].copy()
        if len(self.archive) < 2:  # the seeds' results are not all in (in_flight > seeds): cross seeds
            a, b = self._seed_pair()
        else:
            a, b = self._parents()
        split = int(self.rng.integers(0, self.n_positions)) if self.opt.split_point else self.n_positions
        w = float(self.rng.random())
        return crossover(a, b, self.positions, split, w)

    def _seed_pair(self) -> tuple[np.ndarray, np.ndarray]:
        i, j = self.rng.choice(len(self.seeds), size=2, replace=False)
        return self.seeds[i], self.seeds[j]

    def _parents(self) -> tuple[np.ndarray, np.ndarray]:
        scores = np.array(self.scores)
        fit, reward = shared_fitness(scores, self.capacity, self.opt.alpha)
        n = len(self.archive)
        first = self._draw(fit, np.ones(n, dtype=bool))
        others = np.arange(n) != first
        if self.opt.attraction:
            gain = np.maximum(scores - scores[first], 0.0) @ reward
            second = self._draw(gain, others) if gain[others].sum() > 0 else self._draw(fit, others)
        else:
            second = self._draw(fit, others)
        self.parents.append((first, second))
        return self.archive[first], self.archive[second]

    def _draw(self, weight: np.ndarray, allowed: np.ndarray) -> int:
        """An index drawn with probability proportional to ``weight`` among ``allowed`` (uniform
        among them when every weight there is 0)."""
        w = np.where(allowed, np.maximum(weight, 0.0), 0.0)
        p = w / w.sum() if w.sum() > 0 else allowed / allowed.sum()
        return int(self.rng.choice(len(p), p=p))

    # ------------------------------------------------------------------ tell
    def tell(self, genomes: np.ndarray, fitness: np.ndarray) -> None:
        raise TypeError("m2n2 is told per-item scores (tell_items), not a fitness")

    def tell_items(self, genome: np.ndarray, scores: np.ndarray, capacity: np.ndarray) -> None:
        """One candidate's per-item scores (0 for a failed one) on the search's fixed items."""
        scores = np.maximum(np.asarray(scores, dtype=np.float64), 0.0)  # a score below 0 claims no resource
        capacity = np.asarray(capacity, dtype=np.float64)
        if self.capacity is None:
            self.capacity = capacity
        elif scores.shape != self.capacity.shape or not np.array_equal(capacity, self.capacity):
            raise ValueError("m2n2: every candidate must be scored on the same items")
        if not np.all(np.isfinite(scores)):
            raise ValueError("m2n2: per-item scores must be finite")
        self.told += 1
        self.generation = self.told // self.popsize
        genome = np.asarray(genome, dtype=np.float64).copy()
        if len(self.archive) < self.opt.archive_size:
            self.archive.append(genome)
            self.scores.append(scores)
            return
        fit, _ = shared_fitness(np.array([*self.scores, scores]), self.capacity, self.opt.alpha)
        worst = int(np.argmin(fit))
        if worst < len(self.archive):  # else the child is the worst: it does not enter
            self.archive[worst] = genome
            self.scores[worst] = scores

    def state_dict(self) -> dict:
        d = super().state_dict()
        fit = (shared_fitness(np.array(self.scores), self.capacity, self.opt.alpha)[0].tolist()
               if self.scores else [])
        d.update({"asked": self.asked, "told": self.told, "options": self.opt.model_dump(mode="json"),
                  "archive": [g.tolist() for g in self.archive], "shared_fitness": fit,
                  "mean_score": [float(s @ self.capacity) for s in self.scores],
                  "parents": self.parents[-self.popsize:]})
        return d
