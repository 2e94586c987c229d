"""The DFS codec: genome (unit cube) <-> layer path. Pure; loads no weights.

Genes, in order:
1. one indicator gene per slot: repeat 0..r-1, then source model in config order, then layer
   (the fixed ends, model A's first and last layers, have no slots when ``fix_ends``); a slot is
   kept when its gene is > 0.5 (Sakana's I_t > 0, moved into the cube);
2. the scales: ``matrix``: W[i][j] for every (previous layer i, layer j) pair, i-major;
   ``per_layer``: one per layer j; ``none``: no genes. Gene x maps to low * (high/low)^x.

Decoding is a projection onto the feasible set, like clipping into the cube: the path is
[A's first layer] + kept slots + [A's last layer] (without ``fix_ends``: the kept slots, or the
slot with the highest gene if none is kept), cut to ``max_path_length`` (the fixed end stays);
the first step's scale is 1 (its input is the embeddings), each later one is W[previous, this],
clipped so that every prefix product stays within [1/B, B] (B = ``max_scale_product``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evomerge.recipes.layer_path import PathRecipe, PathStep
from evomerge.search.spaces.dataflow import DfsSpace


@dataclass(frozen=True)
class Node:
    model: int  # index into the codec's models
    layer: int


class PathCodec:
    def __init__(self, space: DfsSpace, models: list[str], layer_counts: list[int],
                 dtype: str = "float32"):
        if not models:
            raise ValueError("models: at least one source model is needed")
        if len(layer_counts) != len(models):
            raise ValueError("one layer count per model is needed")
        if space.fix_ends and layer_counts[0] < 2:
            raise ValueError(f"fix_ends needs model A ({models[0]}) to have at least 2 layers")
        self.space, self.models, self.dtype = space, list(models), dtype
        self.nodes = [Node(m, la) for m, n in enumerate(layer_counts) for la in range(n)]
        self._node_index = {nd: i for i, nd in enumerate(self.nodes)}
        last_a = layer_counts[0] - 1
        self.start = Node(0, 0) if space.fix_ends else None
        self.end = Node(0, last_a) if space.fix_ends else None
        fixed = {self.start, self.end} - {None}
        self.slots = [nd for _ in range(space.repeats) for nd in self.nodes if nd not in fixed]
        n_slots_max = len(self.slots) + len(fixed)
        if space.max_path_length is not None and space.max_path_length > n_slots_max:
            raise ValueError(f"max_path_length={space.max_path_length} exceeds the {n_slots_max} "
                             f"steps the space can form ({space.repeats} repeats of {len(self.nodes)} layers)")
        m = len(self.nodes)
        self.n_scale_genes = {"matrix": m * m, "per_layer": m, "none": 0}[space.scale.param]

        self.per_repeat = len(self.slots) // space.repeats
        # Model A's layers start kept in the first repeat: the start path is model A itself.
        x0 = [space.init.model_a if i < self.per_repeat and nd.model == 0 else space.init.other
              for i, nd in enumerate(self.slots)]
        x0 += [space.scale.position(space.scale.init)] * self.n_scale_genes
        self.x0 = np.array(x0, dtype=np.float64)

    @property
    def dim(self) -> int:
        return len(self.slots) + self.n_scale_genes

    # ------------------------------------------------------------------ genome -> path
    def _scale_gene(self, x: np.ndarray, prev: Node, node: Node) -> float:
        param = self.space.scale.param
        if param == "none":
            return 1.0
        j = self._node_index[node]
        k = self._node_index[prev] * len(self.nodes) + j if param == "matrix" else j
        return self.space.scale.value(float(x[len(self.slots) + k]))

    def decode(self, genome: np.ndarray) -> list[tuple[Node, float]]:
        """The path as (node, scale) pairs; genes outside the cube are clipped to it."""
        genome = np.asarray(genome, dtype=np.float64)
        if genome.shape != (self.dim,):
            raise ValueError(f"genome has shape {genome.shape}, the space has {self.dim} genes")
        x = np.clip(genome, 0.0, 1.0)
        ind = x[: len(self.slots)]
        kept = [nd for nd, v in zip(self.slots, ind, strict=True) if v > 0.5]
        limit = self.space.max_path_length
        if self.space.fix_ends:
            if limit is not None:
                kept = kept[: limit - 2]
            nodes = [self.start, *kept, self.end]
        else:
            if not kept:  # a path needs one step: the most wanted slot
                kept = [self.slots[int(np.argmax(ind))]]
            nodes = kept[:limit] if limit is not None else kept
        bound = self.space.max_scale_product
        path, product = [], 1.0
        for i, nd in enumerate(nodes):
            scale = 1.0 if i == 0 else self._scale_gene(x, nodes[i - 1], nd)
            scale = min(max(scale, 1 / (bound * product)), bound / product)
            product *= scale
            path.append((nd, scale))
        return path

    def to_recipe(self, genome: np.ndarray) -> PathRecipe:
        path = self.decode(genome)
        steps = [PathStep(model=self.models[nd.model], layer=nd.layer, scale=s) for nd, s in path]
        return PathRecipe(path=steps, embeddings=steps[0].model, head=steps[-1].model,
                          dtype=self.dtype)  # type: ignore[arg-type]

    def describe(self) -> list[str]:
        lines = [f"{i:3d} slot: {self.models[nd.model]} layer {nd.layer} (repeat "
                 f"{i // self.per_repeat})" for i, nd in enumerate(self.slots)]
        if self.n_scale_genes:
            s = self.space.scale
            lines.append(f"{len(self.slots):3d}..{self.dim - 1} scales ({s.param}) in [{s.low}, {s.high}]")
        return lines
