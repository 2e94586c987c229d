"""breadcrumbs_ties: breadcrumbs' outlier-and-small trim, then TIES sign consensus."""

from __future__ import annotations

from evomerge.methods.base import Paper
from evomerge.methods.generalized import GAMMA, Consensus, TaskArithmeticMerge
from evomerge.methods.sparsify import Sparsifier

METHOD = TaskArithmeticMerge(
    name="breadcrumbs_ties",
    paper=Paper(
        "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
        "2312.06795",
    ),
    consensus=Consensus.SUM,
    sparsifier=Sparsifier.MAGNITUDE_OUTLIERS,
    normalize_default=False,
    rescale_default=False,
    extras=(GAMMA,),
)
