"""A layer-order recipe built in memory: the source models' layers, shared, in the path's order.

No weights are copied. Each step is a shallow copy of its source decoder layer: new module
objects that hold the same parameter and buffer tensors, so a layer used three times costs three
small Python objects. Each copy gets its own ``layer_idx`` (HF attention keys its KV cache by
it: a repeated layer must not share a cache slot with its other uses), and the path's config has
``len(path)`` layers with the per-layer lists (``layer_types``, ...) remapped to the steps. A
forward pre-hook scales the step's input: the step computes ``layer(hidden * scale)``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from itertools import chain

import torch
from torch import nn

from evomerge.core.errors import ArchitectureError
from evomerge.recipes.fold import check_path, path_config_updates
from evomerge.recipes.layer_path import PathRecipe


def _same(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def share_module(module: nn.Module) -> nn.Module:
    """A copy of a module tree whose every module is a new object holding the same tensors."""
    new = copy.copy(module)  # a new __dict__ whose values are the original's objects
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    new._modules = {k: None if c is None else share_module(c) for k, c in module._modules.items()}
    for key, value in module.__dict__.items():
        if "hooks" in key and isinstance(value, dict):  # own hook tables: ours must not leak back
            setattr(new, key, type(value)(value))
    return new


def _scale_input(scale: float):
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        if args:
            return (args[0] * scale, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * scale}

    return hook


def step_module(layer: nn.Module, index: int, scale: float) -> nn.Module:
    """Step ``index`` of a path: ``layer`` shared, with its own layer_idx, reading hidden*scale."""
    step = share_module(layer)
    for m in step.modules():
        if hasattr(m, "layer_idx"):
            m.layer_idx = index
    if scale != 1.0:
        step.register_forward_pre_hook(_scale_input(scale), with_kwargs=True)
    return step


def assemble(recipe: PathRecipe, models: Mapping[str, nn.Module]) -> nn.Module:
    """The path model over loaded source models (``models``: name -> *ForCausalLM)."""
    def model_of(name: str) -> nn.Module:
        found = next((m for k, m in models.items() if _same(k, name)), None)
        if found is None:
            raise ValueError(f"model {name!r} of the recipe is not among the loaded models")
        return found

    configs = {name: model_of(name).config.to_dict() for name in recipe.referenced_models()}
    spec = check_path(recipe, configs)
    emb, head = model_of(recipe.embeddings), model_of(recipe.head)
    config = copy.deepcopy(emb.config)
    for key, value in path_config_updates(recipe, configs).items():
        setattr(config, key, value)

    with torch.device("meta"):  # the shell's own weights are replaced below: allocate nothing
        shell = type(emb)(config)
    inner = getattr(shell, spec.inner)
    for name in spec.embeddings:
        setattr(inner, name, getattr(getattr(emb, spec.inner), name))
    steps = [step_module(getattr(getattr(model_of(s.model), spec.inner), spec.layers)[s.layer], i, s.scale)
             for i, s in enumerate(recipe.path)]
    setattr(inner, spec.layers, nn.ModuleList(steps))
    setattr(inner, spec.norm, getattr(getattr(head, spec.inner), spec.norm))
    shell.lm_head = head.lm_head
    left = [n for n, t in chain(shell.named_parameters(), shell.named_buffers()) if t.is_meta]
    if left:
        raise ArchitectureError(f"the path model has tensors no source provides: {left[:5]}")
    shell.generation_config = copy.deepcopy(emb.generation_config)
    return shell.eval()


class PathBuilder:
    """The DFS search's candidate builder: loads every source once, assembles paths from them."""

    def __init__(self, models: list[str], *, device: str = "cpu", dtype: str = "float32",
                 allow_pickle: bool = False):
        from evomerge.models.folders import load_causal_lm

        self.sources = {m: load_causal_lm(m, device=device, dtype=dtype, allow_pickle=allow_pickle)
                        for m in models}
        self.model: nn.Module = next(iter(self.sources.values()))

    def build(self, recipe: PathRecipe) -> nn.Module:
        if not isinstance(recipe, PathRecipe):
            raise TypeError(f"PathBuilder builds layer-order recipes, not {type(recipe).__name__}")
        self.model = assemble(recipe, self.sources)
        return self.model
