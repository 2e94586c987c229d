"""dare_linear: DARE's random drop-and-rescale, deltas summed without consensus."""

from __future__ import annotations

from evomerge.methods.base import Paper
from evomerge.methods.generalized import TaskArithmeticMerge
from evomerge.methods.sparsify import Sparsifier

METHOD = TaskArithmeticMerge(
    name="dare_linear",
    paper=Paper(
        "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
        "2311.03099",
    ),
    consensus=None,
    sparsifier=Sparsifier.RANDOM,
    normalize_default=False,
    rescale_default=True,
)
