"""della: magnitude-rank dependent random drop (MAGPRUNE), L1 rescale, TIES sign consensus."""

from __future__ import annotations

from evomerge.methods.base import Paper
from evomerge.methods.generalized import EPSILON, Consensus, TaskArithmeticMerge
from evomerge.methods.sparsify import Sparsifier

METHOD = TaskArithmeticMerge(
    name="della",
    paper=Paper(
        "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling",
        "2406.11617",
    ),
    consensus=Consensus.SUM,
    sparsifier=Sparsifier.DELLA_MAGPRUNE,
    normalize_default=True,
    rescale_default=True,
    extras=(EPSILON,),
)
