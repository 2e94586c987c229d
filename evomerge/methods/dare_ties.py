"""dare_ties: DARE's random drop-and-rescale, then TIES sign consensus."""

from __future__ import annotations

from evomerge.methods.base import Paper
from evomerge.methods.generalized import Consensus, TaskArithmeticMerge
from evomerge.methods.sparsify import Sparsifier

METHOD = TaskArithmeticMerge(
    name="dare_ties",
    paper=Paper(
        "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
        "2311.03099",
    ),
    consensus=Consensus.SUM,
    sparsifier=Sparsifier.RANDOM,
    normalize_default=False,
    rescale_default=True,
)
