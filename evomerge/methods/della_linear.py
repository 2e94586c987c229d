"""della_linear: DELLA's MAGPRUNE drop and rescale, deltas summed without consensus."""

from __future__ import annotations

from evomerge.methods.base import Paper
from evomerge.methods.generalized import EPSILON, TaskArithmeticMerge
from evomerge.methods.sparsify import Sparsifier

METHOD = TaskArithmeticMerge(
    name="della_linear",
    paper=Paper(
        "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling",
        "2406.11617",
    ),
    consensus=None,
    sparsifier=Sparsifier.DELLA_MAGPRUNE,
    normalize_default=False,
    rescale_default=True,
    extras=(EPSILON,),
)
