"""iso_c: isotropic merging in the common subspace (Marczak et al. 2025): the summed task
matrix with a flat spectrum (math in iso.py)."""

from __future__ import annotations

from evomerge.methods.iso import PAPER, merge_iso
from evomerge.methods.spectral import ALPHA, WEIGHT
from evomerge.methods.whole import BasePolicy, WholeTensorMerge

METHOD = WholeTensorMerge(
    name="iso_c",
    paper=PAPER,
    params=(WEIGHT, ALPHA),
    fn=lambda inputs, shared, per_source: merge_iso(inputs, shared, per_source, common=True),
    base_policy=BasePolicy.REQUIRED,
    min_non_base=1,
)
