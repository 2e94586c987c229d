"""The cma optimizer's option records, apart from pycma so that a config can read their
defaults without importing pycma (about 0.7 s); optimizers/cma.py uses them."""

from __future__ import annotations

from dataclasses import dataclass

AUTO_SEPARABLE_DIM = 20  # separable: auto -> diagonal covariance above this many genes
PLAIN_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)  # plain merges: every per-model gene at one of these positions


@dataclass(frozen=True)
class Restarts:
    """IPOP (each restart ``incpopsize`` x the population) or BIPOP (pycma's interleaving of such
    large-population runs with small-population local runs). ``max`` counts the large restarts
    (BIPOP's small runs are not counted, as in pycma)."""

    kind: str = "ipop"  # ipop | bipop
    max: int = 3
    incpopsize: float = 2.0
    tolfun: float | None = None  # pycma's termination tolerances (None: pycma's defaults)
    tolx: float | None = None
    patience: int | None = None  # also stop a run after this many generations without improving
    start: str = "random"  # random | x0: where a restart begins
