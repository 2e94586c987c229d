"""breadcrumbs: drop the largest (gamma) and the smallest deltas, no consensus."""

from __future__ import annotations

from evomerge.methods.base import Paper
from evomerge.methods.generalized import GAMMA, TaskArithmeticMerge
from evomerge.methods.sparsify import Sparsifier

METHOD = TaskArithmeticMerge(
    name="breadcrumbs",
    paper=Paper(
        "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
        "2312.06795",
    ),
    consensus=None,
    sparsifier=Sparsifier.MAGNITUDE_OUTLIERS,
    normalize_default=False,
    rescale_default=False,
    extras=(GAMMA,),
)
