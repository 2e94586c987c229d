"""Permutation alignment of Llama-style models (Git Re-Basin; docs/zipit.md): which axis of
each tensor a permutation acts on (blocks.py) and weight matching (matching.py)."""

from evomerge.methods.align.blocks import (
    FAMILIES,
    Alignment,
    Axis,
    BlockShape,
    permute_state,
    permute_tensor,
    tensor_axes,
)
from evomerge.methods.align.matching import aligned_state, weight_matching

__all__ = ["FAMILIES", "Alignment", "Axis", "BlockShape", "aligned_state", "permute_state",
           "permute_tensor", "tensor_axes", "weight_matching"]
