"""task_arithmetic: B + lambda * sum_i w_i (x_i - B), no sparsifier, no consensus."""

from __future__ import annotations

from evomerge.methods.base import Paper
from evomerge.methods.generalized import TaskArithmeticMerge

METHOD = TaskArithmeticMerge(
    name="task_arithmetic",
    paper=Paper(
        "Editing Models with Task Arithmetic",
        "2212.04089",
    ),
    consensus=None,
    sparsifier=None,
    normalize_default=False,
    rescale_default=False,
)
