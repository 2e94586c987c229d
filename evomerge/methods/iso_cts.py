"""iso_cts: isotropic merging in the common and task-specific subspaces (Marczak et al. 2025);
`common_space_fraction` (default 0.8, the paper's) of the rank for the common subspace, the rest
split evenly among the tasks (math in iso.py)."""

from __future__ import annotations

from evomerge.methods.iso import COMMON_SPACE_FRACTION, PAPER, merge_iso
from evomerge.methods.spectral import ALPHA, WEIGHT
from evomerge.methods.whole import BasePolicy, WholeTensorMerge

METHOD = WholeTensorMerge(
    name="iso_cts",
    paper=PAPER,
    params=(WEIGHT, COMMON_SPACE_FRACTION, ALPHA),
    fn=lambda inputs, shared, per_source: merge_iso(inputs, shared, per_source, common=False),
    base_policy=BasePolicy.REQUIRED,
    min_non_base=1,
)
