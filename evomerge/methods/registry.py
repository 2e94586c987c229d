"""The registry of merge methods: name -> method (metadata plus tensor math).

Every method lives in its own module (linear.py, ties.py, ...) and declares its name, the paper it
comes from, its parameters (names, defaults, scopes), whether it needs a base model and how many
sources it takes; this module collects them, answers look-ups by name, and says clearly when a
mergekit 0.1.5 method is one that evomerge does not implement. Semantics follow mergekit 0.1.5
(docs/merge.md and the merge-math reference).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.methods import (
    arcee_fusion,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    iso_c,
    iso_cts,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    ramplus_tl,
    sce,
    slerp,
    task_arithmetic,
    ties,
    tsv,
)
from evomerge.methods.base import MergeMethod, Paper, ParamScope, ParamSpec, TensorGroup
from evomerge.methods.generalized import Consensus, TaskArithmeticMerge
from evomerge.methods.linear import LinearMerge
from evomerge.methods.passthrough import PassthroughMerge
from evomerge.methods.sparsify import Sparsifier
from evomerge.methods.whole import BasePolicy, WholeTensorMerge

_METHODS: dict[str, MergeMethod] = {
    m.METHOD.name: m.METHOD
    for m in (linear, passthrough, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
              breadcrumbs_ties, della, della_linear, slerp, nuslerp, multislerp, karcher,
              model_stock, nearswap, arcee_fusion, sce, ram, ramplus_tl, tsv, iso_c, iso_cts)
}

# The 20 methods mergekit 0.1.5 registers (mergekit/merge_methods/registry.py).
MERGEKIT_METHODS: tuple[str, ...] = (
    "arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della",
    "della_linear", "karcher", "linear", "model_stock", "multislerp", "nearswap", "nuslerp",
    "passthrough", "ram", "ramplus_tl", "sce", "slerp", "task_arithmetic", "ties",
)

# evomerge's own methods beyond mergekit's (no mergekit recipe can run them): the spectral
# interference-aware merges TSV-Merge, Iso-C and Iso-CTS (docs/merge.md).
EVOMERGE_ONLY: tuple[str, ...] = ("iso_c", "iso_cts", "tsv")

# mergekit 0.1.5's methods that evomerge does not implement (none today): a recipe using one is
# told so, rather than that the name is unknown.
MERGEKIT_ONLY: tuple[str, ...] = tuple(n for n in MERGEKIT_METHODS if n not in _METHODS)


def method_names() -> list[str]:
    return sorted(_METHODS)


def registered_methods() -> list[MergeMethod]:
    """Every method evomerge implements, sorted by name."""
    return [_METHODS[n] for n in method_names()]


def get_method(name: str) -> MergeMethod:
    try:
        return _METHODS[name]
    except KeyError:
        pass
    if name == "lorahub":  # over LoRA adapters only, so not among the registered methods
        from evomerge.methods.lorahub import METHOD as LORAHUB

        return LORAHUB
    supported = ", ".join(method_names())
    if name in MERGEKIT_ONLY:
        raise ValueError(
            f"merge_method {name!r} is a mergekit method that is not supported by evomerge; "
            f"supported: {supported}"
        )
    raise ValueError(f"unknown merge_method {name!r}; valid: {supported}")


def param_spec(method: MergeMethod, name: str) -> ParamSpec | None:
    return next((p for p in method.params if p.name == name), None)


def uses_random_masks(method: MergeMethod) -> bool:
    return getattr(method, "sparsifier", None) in (Sparsifier.RANDOM, Sparsifier.DELLA_MAGPRUNE)


def fine_tune_count(method: MergeMethod, available: int, has_base: bool) -> int:
    """How many sources besides the base (up to `available`, at least 1) one slice of `method`
    takes, with or without the base among its sources: its input contract (slerp: one beside the
    base; nuslerp: at most two; passthrough: one)."""
    n = available
    if getattr(method, "max_non_base", None) is not None:
        n = min(n, method.max_non_base)
    if method.max_sources is not None:
        n = min(n, method.max_sources - int(has_base))
    return max(1, n)


def merge_group(
    method: MergeMethod,
    group: TensorGroup,
    shared: Mapping[str, Any],
    per_source: Mapping[int, Mapping[str, Any]],
    *,
    mask_seed: int = 0,
) -> torch.Tensor:
    """Merge one tensor; non-float tensors (integer buffers) are copied from the first source."""
    first = next(iter(group.tensors.values()))
    if not first.is_floating_point():
        return group.tensors[group.base] if group.base is not None else first
    return method.merge(group, shared, per_source, mask_seed=mask_seed)


__all__: Sequence[str] = [
    "MERGEKIT_METHODS",
    "MERGEKIT_ONLY",
    "EVOMERGE_ONLY",
    "BasePolicy",
    "WholeTensorMerge",
    "Consensus",
    "LinearMerge",
    "MergeMethod",
    "Paper",
    "ParamScope",
    "ParamSpec",
    "PassthroughMerge",
    "TaskArithmeticMerge",
    "TensorGroup",
    "fine_tune_count",
    "get_method",
    "merge_group",
    "method_names",
    "param_spec",
    "registered_methods",
    "uses_random_masks",
]
