"""linear: a weighted average of the sources (model soups)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evomerge.methods.base import Paper, ParamScope, ParamSpec


@dataclass(frozen=True)
class LinearMerge:
    """R = sum_i w_i x_i, divided by sum_i w_i if normalize; accumulated in float32."""

    name: str = "linear"
    paper: Paper | None = Paper(
        "Model soups: averaging weights of multiple fine-tuned models improves accuracy without "
        "increasing inference time", "2203.05482")
    params: tuple[ParamSpec, ...] = (
        ParamSpec("weight", float, ParamScope.INPUT),
        ParamSpec("normalize", bool, ParamScope.SHARED, True),
    )
    requires_base: bool = False
    max_sources: int | None = None

    def check_source_params(self, params) -> None:
        pass  # any number is a valid weight

    def merge(self, group, shared, per_source, *, mask_seed):
        keys = sorted(group.tensors)  # recipe order, whatever order the mapping was built in
        first = group.tensors[keys[0]]
        if not first.is_floating_point():
            raise ValueError(f"linear merging needs floating-point tensors ({group.name})")
        # mergekit accumulates in float32 (float64 stays float64) and casts back at the end.
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        weights = torch.tensor([per_source[k]["weight"] for k in keys], dtype=dtype)
        result = torch.zeros_like(first, dtype=dtype)
        for k, w in zip(keys, weights.unbind(0), strict=True):
            result.addcmul_(group.tensors[k], w.to(first.device))
        if shared["normalize"]:
            denominator = weights.sum()
            if denominator == 0:
                raise ValueError(
                    f"linear: the weights sum to 0 for {group.name} (normalize: true)"
                )
            result.div_(denominator.to(first.device))
        return result.to(first.dtype)


METHOD = LinearMerge()
