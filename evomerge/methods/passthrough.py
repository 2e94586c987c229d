"""passthrough: copies one source's tensor (layer stacking with `slices:`, "frankenmerges")."""

from __future__ import annotations

from dataclasses import dataclass

from evomerge.methods.base import Paper, ParamScope, ParamSpec


@dataclass(frozen=True)
class PassthroughMerge:
    """Copies the tensor of the single source, optionally scaled."""

    name: str = "passthrough"
    paper: Paper | None = None  # mergekit's own; no paper introduced it
    params: tuple[ParamSpec, ...] = (ParamSpec("scale", float, ParamScope.INPUT, None),)
    requires_base: bool = False
    max_sources: int | None = 1

    def check_source_params(self, params) -> None:
        pass  # any number is a valid scale

    def merge(self, group, shared, per_source, *, mask_seed):
        ((key, tensor),) = group.tensors.items()
        scale = per_source[key].get("scale")
        return tensor if scale is None else tensor * scale


METHOD = PassthroughMerge()
