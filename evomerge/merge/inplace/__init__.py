"""The in-place merger: candidates over fixed sources written into one preallocated model.

Modules, bottom to top: memory (what is held, the memory plan), masks (sparsifier masks),
chunked (the engine's math over chunks), fused (compiled CPU kernels), merger (InPlaceMerger).
"""

from evomerge.merge.inplace.memory import MemoryPlan, memory_plan_from_shapes, plan
from evomerge.merge.inplace.merger import InPlaceMerger

__all__ = ["InPlaceMerger", "MemoryPlan", "memory_plan_from_shapes", "plan"]
