"""Item response theory (IRT) for a cheaper fitness: a 2PL model fitted to the per-item scores of
models already scored, anchor items chosen from it, and a model's full-split metric estimated from
its anchor scores (tinyBenchmarks' p-IRT estimator, the one MERGE3 evolves against).

The model (two-parameter logistic): model i answers item j right with probability
``sigmoid(a_j * theta_i + d_j)``; ``a_j > 0`` is the item's discrimination, ``d_j`` its easiness,
``theta_i`` the model's ability (one per task: the tasks are fitted separately).

Fitting: joint maximum a posteriori (priors ``theta ~ N(0, 1)``, ``a ~ N(1, 0.5^2)``,
``d ~ N(0, 2^2)``, which keep items that every model gets right or wrong finite), by a fixed number
of alternating damped Newton steps over the items' (a, d) and the models' theta, in float64 with
numpy only: no random start, no stochastic optimizer, so the same inputs give the same parameters
bit for bit. Missing entries (a model scored on some items only: the population, on its anchors)
are masked out. Scores in [0, 1] are used as (soft) Bernoulli targets.

Why not a library: py-irt (pyro-ppl, stochastic variational inference, meant for thousands of
responses; it would add pyro, pandas<3, typer<0.15 for one fit) and girth (last release 2021,
marginal maximum likelihood that needs many respondents, no masked entries) fit neither the
handful of fully scored models here nor the determinism the run log needs. The 2PL MAP fit is
about 60 lines.

p-IRT (tinyBenchmarks, Polo et al. 2024): with the item parameters fixed, the candidate's theta is
its MAP estimate from the items it was scored on; the estimate of its metric on the whole split is

    ( sum of its observed item scores + sum over unobserved items of sigmoid(a_j theta + d_j) ) / n

so a candidate scored on every item gets exactly its mean (nothing is predicted).

Anchors (tinyBenchmarks' "anchor points", on the IRT embedding): k-means (seeded k-means++ start,
fixed iterations) of the items' (a, d), the item nearest each centroid; or a seeded random choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evomerge.core.errors import ConfigError

A_PRIOR, A_SD, D_SD, THETA_SD = 1.0, 0.5, 2.0, 1.0
A_MIN = 0.05
FIT_ITERS = 60
STEP = 1.0  # largest Newton step per parameter per iteration (damping)


@dataclass(frozen=True)
class ItemParams:
    """One task's fitted items: discrimination ``a`` and easiness ``d`` per item (index order)."""

    a: np.ndarray
    d: np.ndarray

    @property
    def n(self) -> int:
        return len(self.a)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # stable, no overflow warnings


def _clip(step: np.ndarray) -> np.ndarray:
    return np.clip(step, -STEP, STEP)


def check_responses(y: np.ndarray, what: str) -> None:
    vals = y[np.isfinite(y)]
    if vals.size and (vals.min() < 0 or vals.max() > 1):
        raise ConfigError(f"{what}: IRT needs per-item scores in [0, 1] (an accuracy); got values in "
                          f"[{vals.min()}, {vals.max()}]; use fitness.estimator: mean for this metric")


def fit_2pl(y: np.ndarray, iters: int = FIT_ITERS) -> tuple[ItemParams, np.ndarray]:
    """Fits the 2PL model to ``y`` (models x items, NaN = not scored); returns the items and the
    models' abilities."""
    y = np.asarray(y, dtype=np.float64)
    m = np.isfinite(y)
    yv = np.where(m, y, 0.0)
    mf = m.astype(np.float64)
    n_models, n_items = y.shape
    a = np.full(n_items, A_PRIOR)
    # start: each item's logit of its mean score (shrunk), each model's standardized mean score
    p_item = (yv.sum(0) + 0.5) / (mf.sum(0) + 1.0)
    d = np.log(p_item / (1 - p_item))
    s = (yv.sum(1) + 0.5) / (mf.sum(1) + 1.0)
    theta = (s - s.mean()) / (s.std() + 1e-9) if n_models > 1 else np.zeros(n_models)
    for _ in range(iters):
        # items: one Newton step in (a, d) each, abilities fixed
        p = _sigmoid(np.outer(theta, a) + d)
        r = mf * (yv - p)
        w = mf * p * (1 - p)
        ga = r.T @ theta - (a - A_PRIOR) / A_SD**2
        gd = r.sum(0) - d / D_SD**2
        haa = w.T @ (theta**2) + 1 / A_SD**2
        had = w.T @ theta
        hdd = w.sum(0) + 1 / D_SD**2
        det = haa * hdd - had**2
        a = np.maximum(a + _clip((hdd * ga - had * gd) / det), A_MIN)
        d = d + _clip((haa * gd - had * ga) / det)
        # models: one Newton step in theta each, items fixed
        p = _sigmoid(np.outer(theta, a) + d)
        g = (mf * (yv - p)) @ a - theta / THETA_SD**2
        h = (mf * p * (1 - p)) @ (a**2) + 1 / THETA_SD**2
        theta = theta + _clip(g / h)
    return ItemParams(a, d), theta


def ability(params: ItemParams, items: np.ndarray, values: np.ndarray, iters: int = 40) -> float:
    """The MAP ability of a model that scored ``values`` on ``items`` (item parameters fixed)."""
    a, d = params.a[items], params.d[items]
    theta = 0.0
    for _ in range(iters):
        p = _sigmoid(a * theta + d)
        g = float(np.sum((values - p) * a)) - theta / THETA_SD**2
        h = float(np.sum(p * (1 - p) * a**2)) + 1 / THETA_SD**2
        theta += float(np.clip(g / h, -STEP, STEP))
    return theta


def estimate(params: ItemParams, items, values) -> float:
    """p-IRT: the metric on the whole split (mean over ``params.n`` items) of a model scored
    ``values`` on ``items``: observed items count as scored, the others as predicted."""
    items = np.asarray(items, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    if len(set(items.tolist())) != len(items):
        raise ValueError("estimate: an item is listed twice")
    if len(items) == params.n:
        return float(np.sum(values[np.argsort(items)]) / params.n)  # every item: its mean
    theta = ability(params, items, values)
    rest = np.ones(params.n, dtype=bool)
    rest[items] = False
    predicted = _sigmoid(params.a[rest] * theta + params.d[rest])
    return float((np.sum(values) + np.sum(predicted)) / params.n)


def choose_anchors(params: ItemParams, k: int, seed, how: str = "cluster", task: str = "") -> list[int]:
    """``k`` distinct anchor items (sorted): the items nearest the centroids of a seeded k-means of
    the items' (a, d) (``cluster``), or a seeded random choice (``random``)."""
    n = params.n
    if k > n:
        raise ConfigError(f"fitness.anchors: {k} anchor items per task, but task {task!r} has only {n} "
                          f"items in its split; give at most {n}")
    rng = np.random.default_rng(seed)
    if how == "random" or k == n:
        return sorted(int(i) for i in rng.choice(n, size=k, replace=False))
    x = np.stack([params.a, params.d], axis=1)
    x = (x - x.mean(0)) / (x.std(0) + 1e-12)
    centers = _kmeans_pp(x, k, rng)
    for _ in range(30):
        lab = np.argmin(((x[:, None, :] - centers[None]) ** 2).sum(-1), axis=1)
        for c in range(k):
            if np.any(lab == c):
                centers[c] = x[lab == c].mean(0)
    chosen: list[int] = []
    dist = ((x[:, None, :] - centers[None]) ** 2).sum(-1)
    for c in range(k):  # the nearest item not yet chosen (ties: the lower index)
        for i in np.argsort(dist[:, c], kind="stable"):
            if int(i) not in chosen:
                chosen.append(int(i))
                break
    return sorted(chosen)


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centers = [x[int(rng.integers(len(x)))]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None, :] - np.array(centers)[None]) ** 2).sum(-1), axis=1)
        total = d2.sum()
        i = int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(rng.integers(len(x)))
        centers.append(x[i])
    return np.array(centers, dtype=np.float64)
