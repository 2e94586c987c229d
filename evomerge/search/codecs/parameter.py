"""The genome codec: genome (unit cube) <-> merge parameters <-> recipe. Pure; loads no weights.

A genome is a float vector in [0, 1]^n: gene i maps linearly onto its parameter's [low, high]
(the optimizer handles the cube's bounds: pycma's BoundTransform for CMA-ES), so optimizers never
see parameter types. Genes are ordered source model -> parameter -> group, then the method-wide
parameters searched per layer group (slerp's t: `layer_parameters`, as slice parameters), then
the global ones.

The recipe is mergekit's ``slices`` form, one output slice per layer group, so per-layer values
export exactly and mergekit can build the same model. The embeddings' and the output head's own
values ride on the first and last slice as ``{filter, value}`` entries whose filters are the
tensors' full names (a full name is a substring of no other tensor's name); the attention and MLP
halves of a split group use filters ``.self_attn.``-style, on the module names of the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evomerge.methods.registry import get_method
from evomerge.models.sources import Layout
from evomerge.recipes.parameter_space import Recipe
from evomerge.search.spaces.parameter import SearchSpace

_MLP_KEYS = ("mlp", "ffn", "feed_forward", "feedforward", "post_attention", "ln_2")
_ATTN_KEYS = ("attn", "attention", "input_layernorm", "ln_1")


def layer_part(module: str) -> str:
    """``attn`` or ``mlp`` for the first name component of a layer tensor (its norm included)."""
    m = module.lower()
    if any(k in m for k in _MLP_KEYS):
        return "mlp"
    if any(k in m for k in _ATTN_KEYS):
        return "attn"
    raise ValueError(f"cannot tell whether layer module {module!r} belongs to attention or MLP; "
                     "use granularity.split_attn_mlp: false for this architecture")


def tensor_order(suffixes) -> tuple[str, ...]:
    """A layer's tensors in forward order as far as names tell: attention, then MLP, then the rest."""
    def key(sfx: str):
        try:
            return (("attn", "mlp").index(layer_part(sfx.split(".")[0])), sfx)
        except ValueError:
            return (2, sfx)
    return tuple(sorted(suffixes, key=key))


@dataclass(frozen=True)
class Gene:
    param: str
    model: str | None  # None: a method-wide parameter
    group: str  # "embed", "head", "embed+head", "layers 0-1", "layers 0-1 attn", "global"
    low: float
    high: float

    def value(self, x: float) -> float:
        return self.low + float(x) * (self.high - self.low)

    def position(self, value: float) -> float:
        return (value - self.low) / (self.high - self.low)


@dataclass(frozen=True)
class RecipeSettings:
    """Recipe fields that the search holds fixed."""

    dtype: str = "float32"
    mask_seed: int = 0
    tokenizer_source: str | None = None
    out_dtype: str | None = None


class Codec:
    def __init__(self, space: SearchSpace, models: list[str], base_model: str | None,
                 layout: Layout, settings: RecipeSettings = RecipeSettings()):
        method = get_method(space.method)
        if method.requires_base and not base_model:
            raise ValueError(f"base_model: method {space.method!r} needs a base model")
        if not models:
            raise ValueError("models: at least one source model is needed")
        self.space, self.models, self.base_model = space, list(models), base_model
        self.layout, self.settings = layout, settings
        self.method = method
        n_layers = layout.num_layers
        g = space.granularity
        k = n_layers if g.layers_per_group == "all" else g.layers_per_group
        if n_layers % k:
            raise ValueError(f"granularity.layers_per_group: {k} does not divide the {n_layers} layers")
        self.layer_groups = [(s, s + k) for s in range(0, n_layers, k)]
        self.tensors = g.tensors
        self.parts: tuple[str | None, ...] = (("attn", "mlp") if g.split_attn_mlp else
                                              tensor_order(layout.layer_suffixes) if g.tensors else (None,))
        modules = sorted({suffix.split(".")[0] for suffix in layout.layer_suffixes})
        self.module_parts = {m: layer_part(m) for m in modules} if g.split_attn_mlp else {}
        self.own_ends = g.embeddings == "own"
        self.tied = layout.tied

        groups: list[str] = []
        if self.tensors:
            groups += [f"embed {t}" for t in layout.pre]
        elif self.own_ends:
            groups.append("embed+head" if self.tied else "embed")
        for s, e in self.layer_groups:
            groups += [self._group_name(s, e, p) for p in self.parts]
        if self.tensors:
            groups += [f"head {t}" for t in layout.post]
        elif self.own_ends and not self.tied:
            groups.append("head")
        self.groups = groups
        if self.tensors:  # a layer tensor's value: the first filter (longest first) that its name holds
            self.filters = sorted(self.parts, key=lambda sfx: (-len(sfx), sfx))
            for sfx in self.parts:
                first = next(f for f in self.filters if f".{f}" in layout.layer_name(0, sfx))
                if first != sfx:
                    raise ValueError(f"granularity.tensors: the filter of layer tensor {first!r} also "
                                     f"matches {sfx!r}, so they cannot take values of their own")

        n = len(self.models)
        genes, x0 = [], []
        for m in self.models:
            for p, rng in space.parameters.items():
                for grp in groups:
                    genes.append(Gene(p, m, grp, rng.low, rng.high))
                    x0.append((rng.start(n) - rng.low) / (rng.high - rng.low))
        for p, rng in space.layer_parameters.items():  # method-wide, one per group
            for grp in groups:
                genes.append(Gene(p, None, grp, rng.low, rng.high))
                x0.append((rng.start(n) - rng.low) / (rng.high - rng.low))
        for p, rng in space.global_parameters.items():
            genes.append(Gene(p, None, "global", rng.low, rng.high))
            x0.append((rng.start(n) - rng.low) / (rng.high - rng.low))
        self.genes = genes
        self.x0 = np.array(x0, dtype=np.float64)
        self._index = {(gn.model, gn.param, gn.group): i for i, gn in enumerate(genes)}

    def positions(self) -> np.ndarray:
        """Each gene's place along the model's parameter order (its group's index: embeddings,
        layers in order, head; M2N2's split points cut this order); method-wide genes searched
        once for the whole model take place 0."""
        index = {g: i for i, g in enumerate(self.groups)}
        return np.array([index.get(g.group, 0) for g in self.genes], dtype=np.int64)

    @staticmethod
    def _group_name(start: int, end: int, part: str | None) -> str:
        name = f"layers {start}-{end - 1}"
        return f"{name} {part}" if part else name

    @property
    def dim(self) -> int:
        return len(self.genes)

    # ------------------------------------------------------------------ genome <-> parameters
    def decode(self, genome: np.ndarray) -> dict[tuple[str | None, str, str], float]:
        """``{(model, param, group): value}``; genes outside the cube are clipped to it."""
        genome = np.asarray(genome, dtype=np.float64)
        if genome.shape != (self.dim,):
            raise ValueError(f"genome has shape {genome.shape}, the space has {self.dim} genes")
        clipped = np.clip(genome, 0.0, 1.0)
        return {(g.model, g.param, g.group): g.value(x) for g, x in zip(self.genes, clipped, strict=True)}

    def encode(self, values: dict[tuple[str | None, str, str], float]) -> np.ndarray:
        out = np.empty(self.dim)
        for i, g in enumerate(self.genes):
            out[i] = g.position(values[(g.model, g.param, g.group)])
        return out

    # ------------------------------------------------------------------ parameters -> recipe
    def _setting(self, values, model: str | None, param: str, slice_index: int):
        """One source's value of ``param`` in one output slice: a scalar or a filter list."""
        start, end = self.layer_groups[slice_index]
        last = len(self.layer_groups) - 1
        if self.tensors:
            ends = ([(t, f"embed {t}") for t in self.layout.pre] if slice_index == 0 else []) + \
                   ([(t, f"head {t}") for t in self.layout.post] if slice_index == last else [])
            return [{"filter": t, "value": values[(model, param, grp)]} for t, grp in ends] + \
                   [{"filter": f".{sfx}", "value": values[(model, param, self._group_name(start, end, sfx))]}
                    for sfx in self.filters]
        layer_vals = {p: values[(model, param, self._group_name(start, end, p))] for p in self.parts}
        entries = []
        if self.own_ends:
            head_group = "embed+head" if self.tied else "head"
            embed_group = "embed+head" if self.tied else "embed"
            if slice_index == 0:
                entries += [{"filter": t, "value": values[(model, param, embed_group)]} for t in self.layout.pre]
            if slice_index == last:
                entries += [{"filter": t, "value": values[(model, param, head_group)]} for t in self.layout.post]
        if self.module_parts:
            entries += [{"filter": f".{mod}.", "value": layer_vals[part]} for mod, part in self.module_parts.items()]
            # with_layers: the embeddings/head follow the group's attention value
            entries.append({"filter": None, "value": layer_vals["attn"]})
        elif entries:
            entries.append({"filter": None, "value": layer_vals[None]})
        return entries if entries else layer_vals[None]

    def to_recipe(self, genome: np.ndarray) -> Recipe:
        values = self.decode(genome)
        slices = []
        for i, (start, end) in enumerate(self.layer_groups):
            sources = []
            for m in self.models:
                params = {p: self._setting(values, m, p, i) for p in self.space.parameters}
                sources.append({"model": m, "layer_range": [start, end], "parameters": params})
            if self.base_model and self.base_model not in self.models:
                sources.append({"model": self.base_model, "layer_range": [start, end]})
            layer = {p: self._setting(values, None, p, i) for p in self.space.layer_parameters}
            slices.append({"sources": sources, **({"parameters": layer} if layer else {})})
        shared = dict(self.space.fixed)
        shared.update({g.param: values[(None, g.param, "global")] for g in self.genes
                       if g.model is None and g.group == "global"})
        data = {"merge_method": self.space.method, "slices": slices, "dtype": self.settings.dtype,
                "mask_seed": self.settings.mask_seed}
        if self.base_model:
            data["base_model"] = self.base_model
        if shared:
            data["parameters"] = shared
        if self.settings.tokenizer_source:
            data["tokenizer_source"] = self.settings.tokenizer_source
        if self.settings.out_dtype:
            data["out_dtype"] = self.settings.out_dtype
        return Recipe.from_dict(data)

    def describe(self) -> list[str]:
        return [f"{i:3d} {g.model or '(global)'} {g.param} [{g.group}] in [{g.low}, {g.high}]"
                for i, g in enumerate(self.genes)]


def make_codec(cfg, load_source=None) -> Codec:
    """The codec of a search config's space kind: parameter space (``Codec``) or data flow
    (``dataflow.codec.PathCodec``). Reads config.json / tensor names only (``load_source``: the
    source indexer, ``merge.sources.load_source`` by default)."""
    from evomerge.search.spaces.dataflow import DfsSpace

    if load_source is None:
        from evomerge.models.sources import load_source
    space = cfg.space
    if isinstance(space, DfsSpace):
        from evomerge.search.codecs.dataflow import PathCodec
        from evomerge.search.validation import check_dfs_sources

        return PathCodec(space, cfg.models, check_dfs_sources(cfg), dtype=cfg.dtype)  # type: ignore[return-value]
    layout = load_source(cfg.base_model or cfg.models[0], allow_pickle=cfg.allow_pickle).layout
    return Codec(space, cfg.models, cfg.base_model, layout,
                 RecipeSettings(dtype=cfg.dtype, mask_seed=cfg.mask_seed))
