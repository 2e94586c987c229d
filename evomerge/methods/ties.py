"""ties: magnitude top-k trim, sign election by summed weighted deltas, disjoint mean."""

from __future__ import annotations

from evomerge.methods.base import Paper
from evomerge.methods.generalized import Consensus, TaskArithmeticMerge
from evomerge.methods.sparsify import Sparsifier

METHOD = TaskArithmeticMerge(
    name="ties",
    paper=Paper(
        "TIES-Merging: Resolving Interference When Merging Models",
        "2306.01708",
    ),
    consensus=Consensus.SUM,
    sparsifier=Sparsifier.MAGNITUDE,
    normalize_default=True,
    rescale_default=False,
)
