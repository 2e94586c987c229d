"""Which axis of each Llama-style tensor a permutation acts on, and permutations applied.

A Llama-style decoder has three kinds of permutable units (docs/zipit.md):

- the residual stream's basis: one permutation through the whole model (the embeddings' columns,
  every RMSNorm weight, the input side of every projection and lm_head, the output side of o_proj
  and down_proj). RMSNorm's mean of squares does not depend on the order of the features and its
  weight is elementwise, so permuting the weight with the stream keeps the function;
- each MLP's hidden units: gate_proj and up_proj rows, down_proj columns;
- each attention's heads as whole units: q and k rows move by whole heads (RoPE rotates the
  pairs (i, i + head_dim/2) inside a head, so a head's dimensions stay in place), and with GQA a
  key/value head moves together with the query heads that read it, which may also be reordered
  among themselves.

An `Alignment` holds index vectors: aligned[..., i, ...] = original[..., perm[i], ...] along each
permuted axis. Covered families: `FAMILIES`; any other is refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch

from evomerge.core.errors import MergeError

# model_type -> why its blocks are Llama's (projections, RMSNorm, RoPE, GQA)
FAMILIES: dict[str, str] = {
    "llama": "Llama",
    "mistral": "Llama's blocks (sliding-window attention changes no weight)",
    "qwen2": "Llama's blocks with q/k/v biases",
}


class Axis(StrEnum):
    """What one tensor axis indexes."""

    RESIDUAL = "residual"  # the residual stream's features (hidden_size)
    MLP = "mlp"  # one layer's MLP hidden units (intermediate_size)
    Q_HEADS = "q_heads"  # one layer's query heads, head_dim rows each
    KV_HEADS = "kv_heads"  # one layer's key/value heads, head_dim rows each


_R, _M, _Q, _KV = Axis.RESIDUAL, Axis.MLP, Axis.Q_HEADS, Axis.KV_HEADS
# Per-layer tensor suffix -> the units each axis indexes (None: not permuted).
LAYER_AXES: dict[str, tuple[Axis | None, ...]] = {
    "input_layernorm.weight": (_R,),
    "post_attention_layernorm.weight": (_R,),
    "self_attn.q_proj.weight": (_Q, _R),
    "self_attn.q_proj.bias": (_Q,),
    "self_attn.k_proj.weight": (_KV, _R),
    "self_attn.k_proj.bias": (_KV,),
    "self_attn.v_proj.weight": (_KV, _R),
    "self_attn.v_proj.bias": (_KV,),
    "self_attn.o_proj.weight": (_R, _Q),
    "self_attn.o_proj.bias": (_R,),
    "self_attn.rotary_emb.inv_freq": (None,),
    "mlp.gate_proj.weight": (_M, _R),
    "mlp.gate_proj.bias": (_M,),
    "mlp.up_proj.weight": (_M, _R),
    "mlp.up_proj.bias": (_M,),
    "mlp.down_proj.weight": (_R, _M),
    "mlp.down_proj.bias": (_R,),
}
# Non-layer tensors, by the end of their name.
OUTER_AXES: dict[str, tuple[Axis | None, ...]] = {
    "embed_tokens.weight": (None, _R),
    "lm_head.weight": (None, _R),
    "norm.weight": (_R,),  # the final norm
    "rotary_emb.inv_freq": (None,),
}
_LAYER_NAME = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class BlockShape:
    """The sizes a Llama-style model's permutations act on (from its config.json)."""

    family: str
    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def of(cls, config: Mapping[str, Any], where: str = "model") -> BlockShape:
        family = config.get("model_type")
        if family not in FAMILIES:
            raise MergeError(
                f"{where}: permutation alignment covers Llama-style blocks ({', '.join(FAMILIES)}); "
                f"its model_type is {family!r}, whose blocks it does not cover")
        heads = int(config["num_attention_heads"])
        kv = int(config.get("num_key_value_heads") or heads)
        hidden = int(config["hidden_size"])
        if heads % kv:
            raise MergeError(f"{where}: {heads} query heads do not split into {kv} key/value groups")
        return cls(family=family, num_layers=int(config["num_hidden_layers"]), hidden=hidden,
                   intermediate=int(config["intermediate_size"]), num_heads=heads,
                   num_kv_heads=kv, head_dim=int(config.get("head_dim") or hidden // heads),
                   vocab=int(config["vocab_size"]))


def tensor_axes(name: str) -> tuple[int | None, tuple[Axis | None, ...]]:
    """(layer index or None, the units each axis indexes) of one checkpoint tensor name."""
    m = _LAYER_NAME.match(name)
    if m is not None:
        axes = LAYER_AXES.get(m.group(2))
        if axes is not None:
            return int(m.group(1)), axes
    else:
        for end, axes in OUTER_AXES.items():
            if name == end or name.endswith("." + end):
                return None, axes
    raise MergeError(f"permutation alignment does not know the tensor {name!r} (a Llama-style "
                     "block has q/k/v/o and gate/up/down projections and two RMSNorms)")


@dataclass(frozen=True)
class Alignment:
    """One model's permutations onto another's basis (index vectors, int64).

    `q_heads[l]` is consistent with `kv_heads[l]`: the query heads of the j-th key/value group of
    the aligned model are the query heads of group kv_heads[l][j] of the original, in some order.
    """

    residual: torch.Tensor
    mlp: tuple[torch.Tensor, ...]
    q_heads: tuple[torch.Tensor, ...]
    kv_heads: tuple[torch.Tensor, ...]

    def index(self, axis: Axis, layer: int | None, shape: BlockShape) -> torch.Tensor:
        """The row indices that `axis` of a tensor of `layer` is gathered by."""
        if axis is Axis.RESIDUAL:
            return self.residual
        if layer is None:
            raise MergeError(f"a {axis} axis outside a layer")
        if axis is Axis.MLP:
            return self.mlp[layer]
        heads = (self.q_heads if axis is Axis.Q_HEADS else self.kv_heads)[layer]
        return (heads[:, None] * shape.head_dim + torch.arange(shape.head_dim)).reshape(-1)

    def check(self, shape: BlockShape) -> None:
        """Every vector a permutation of the right size, the heads' groups kept together."""
        def perm(p: torch.Tensor, n: int, what: str) -> None:
            if p.shape != (n,) or not torch.equal(torch.sort(p).values, torch.arange(n)):
                raise MergeError(f"alignment: {what} is not a permutation of {n} units")

        perm(self.residual, shape.hidden, "the residual permutation")
        if not len(self.mlp) == len(self.q_heads) == len(self.kv_heads) == shape.num_layers:
            raise MergeError(f"alignment: not one permutation per layer ({shape.num_layers})")
        for layer in range(shape.num_layers):
            perm(self.mlp[layer], shape.intermediate, f"layer {layer}'s MLP permutation")
            perm(self.kv_heads[layer], shape.num_kv_heads, f"layer {layer}'s kv heads")
            perm(self.q_heads[layer], shape.num_heads, f"layer {layer}'s query heads")
            groups = self.q_heads[layer].reshape(shape.num_kv_heads, shape.group) // shape.group
            if not torch.equal(groups, self.kv_heads[layer][:, None].expand_as(groups)):
                raise MergeError(f"alignment: layer {layer}'s query heads leave their "
                                 "key/value groups")

    def then(self, other: Alignment) -> Alignment:
        """This permutation followed by `other` (apply(apply(x, self), other))."""
        return Alignment(
            residual=self.residual[other.residual],
            mlp=tuple(a[b] for a, b in zip(self.mlp, other.mlp, strict=True)),
            q_heads=tuple(a[b] for a, b in zip(self.q_heads, other.q_heads, strict=True)),
            kv_heads=tuple(a[b] for a, b in zip(self.kv_heads, other.kv_heads, strict=True)))

    @classmethod
    def identity(cls, shape: BlockShape) -> Alignment:
        n = shape.num_layers
        return cls(residual=torch.arange(shape.hidden),
                   mlp=tuple(torch.arange(shape.intermediate) for _ in range(n)),
                   q_heads=tuple(torch.arange(shape.num_heads) for _ in range(n)),
                   kv_heads=tuple(torch.arange(shape.num_kv_heads) for _ in range(n)))

    @classmethod
    def random(cls, shape: BlockShape, generator: torch.Generator) -> Alignment:
        """A uniformly drawn valid alignment (kv heads, then query heads within each group)."""
        n = shape.num_layers

        def draw(k: int) -> torch.Tensor:
            return torch.randperm(k, generator=generator)

        kv = tuple(draw(shape.num_kv_heads) for _ in range(n))
        q = tuple(torch.cat([g * shape.group + draw(shape.group) for g in kv[layer].tolist()])
                  for layer in range(n))
        return cls(residual=draw(shape.hidden),
                   mlp=tuple(draw(shape.intermediate) for _ in range(n)), q_heads=q, kv_heads=kv)


def permute_tensor(name: str, tensor: torch.Tensor, alignment: Alignment,
                   shape: BlockShape) -> torch.Tensor:
    """`tensor` (checkpoint name `name`) in the aligned basis."""
    layer, axes = tensor_axes(name)
    if len(axes) != tensor.dim():
        raise MergeError(f"{name}: {tensor.dim()} axes, a Llama-style block has {len(axes)}")
    for dim, axis in enumerate(axes):
        if axis is not None:
            tensor = tensor.index_select(dim, alignment.index(axis, layer, shape).to(tensor.device))
    return tensor


def permute_state(state: Mapping[str, torch.Tensor], alignment: Alignment,
                  shape: BlockShape) -> dict[str, torch.Tensor]:
    """Every tensor of a state dict in the aligned basis (a tied lm_head follows its embeddings)."""
    return {k: permute_tensor(k, v, alignment, shape) for k, v in state.items()}


__all__ = ["FAMILIES", "LAYER_AXES", "OUTER_AXES", "Alignment", "Axis", "BlockShape",
           "permute_state", "permute_tensor", "tensor_axes"]
