"""Weight matching (Git Re-Basin, Ainsworth et al., ICLR 2023, arXiv 2209.04836): the alignment
of one model onto another that maximizes the sum over tensors of <W_ref, permuted W_other>.

Coordinate ascent, as the paper's Algorithm 1: every permutation starts as the identity; in a
seeded random order each one is solved exactly as a linear assignment problem (scipy's
linear_sum_assignment) with the others held fixed, until a full pass improves none. The
permutations are the residual stream's (one for the whole model), each layer's MLP units and
each layer's attention heads. A head permutation is one kv-head assignment over groups whose
score is the key/value heads' similarity plus the best assignment of the groups' query heads
to each other (a nested assignment), so q, k, v and o move by whole heads and GQA groups stay
together (docs/zipit.md).
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import torch

from evomerge.core.errors import MergeError
from evomerge.methods.align.blocks import Alignment, Axis, BlockShape, permute_tensor, tensor_axes


def _assign(cost: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The permutation p maximizing sum_i cost[i, p[i]], and that sum."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
    p = torch.as_tensor(cols, dtype=torch.int64)[torch.as_tensor(rows).argsort()]
    return p, float(cost[torch.arange(len(p)), p].sum())


def _units(t: torch.Tensor, dim: int, count: int) -> torch.Tensor:
    """`t` as [count, rest]: one row per unit of axis `dim` (a head's head_dim rows together)."""
    return t.movedim(dim, 0).reshape(count, -1).to(torch.float64)


class _Matcher:
    def __init__(self, ref: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                 shape: BlockShape) -> None:
        if set(ref) != set(other):
            raise MergeError(f"alignment: the models' tensors differ: "
                             f"{sorted(set(ref) ^ set(other))[:5]}")
        self.shape = shape
        self.names = {n: tensor_axes(n) for n in ref}
        for n, t in ref.items():
            if other[n].shape != t.shape:
                raise MergeError(f"alignment: different shapes of {n} "
                                 f"({list(other[n].shape)} vs {list(t.shape)})")
        self.ref, self.other = ref, other
        self.current = Alignment.identity(shape)

    def _sizes(self, axis: Axis) -> int:
        s = self.shape
        return {Axis.RESIDUAL: s.hidden, Axis.MLP: s.intermediate, Axis.Q_HEADS: s.num_heads,
                Axis.KV_HEADS: s.num_kv_heads}[axis]

    def cost(self, axis: Axis, layer: int | None) -> torch.Tensor:
        """ref unit i . other unit j over every tensor with `axis`, its other axes aligned."""
        n = self._sizes(axis)
        total = torch.zeros(n, n, dtype=torch.float64)
        for name, (at, axes) in self.names.items():
            if axis not in axes or (axis is not Axis.RESIDUAL and at != layer):
                continue
            dim = axes.index(axis)
            other = self.other[name]
            for d, a in enumerate(axes):  # align every other axis with the current permutations
                if a is not None and d != dim:
                    other = other.index_select(d, self.current.index(a, at, self.shape))
            total += _units(self.ref[name], dim, n) @ _units(other, dim, n).T
        return total

    def score(self, cost: torch.Tensor, p: torch.Tensor) -> float:
        return float(cost[torch.arange(len(p)), p].sum())

    def solve_residual(self) -> bool:
        cost = self.cost(Axis.RESIDUAL, None)
        p, value = _assign(cost)
        better = value > self.score(cost, self.current.residual) + 1e-9 * abs(value)
        if better:
            self.current = _replace(self.current, residual=p)
        return better

    def solve_mlp(self, layer: int) -> bool:
        cost = self.cost(Axis.MLP, layer)
        p, value = _assign(cost)
        better = value > self.score(cost, self.current.mlp[layer]) + 1e-9 * abs(value)
        if better:
            self.current = _replace(self.current, mlp=_set(self.current.mlp, layer, p))
        return better

    def solve_heads(self, layer: int) -> bool:
        g = self.shape.group
        q, kv = self.cost(Axis.Q_HEADS, layer), self.cost(Axis.KV_HEADS, layer)
        groups = torch.zeros_like(kv)
        inner: dict[tuple[int, int], torch.Tensor] = {}
        for a in range(len(kv)):
            for b in range(len(kv)):
                inner[a, b], value = _assign(q[a * g:(a + 1) * g, b * g:(b + 1) * g])
                groups[a, b] = kv[a, b] + value
        kv_p, _ = _assign(groups)
        q_p = torch.cat([int(b) * g + inner[a, int(b)] for a, b in enumerate(kv_p)])
        old = self.score(kv, self.current.kv_heads[layer]) + self.score(
            q, self.current.q_heads[layer])
        new = self.score(kv, kv_p) + self.score(q, q_p)
        better = new > old + 1e-9 * abs(new)
        if better:
            self.current = _replace(self.current, q_heads=_set(self.current.q_heads, layer, q_p),
                                    kv_heads=_set(self.current.kv_heads, layer, kv_p))
        return better


def _set(perms: tuple[torch.Tensor, ...], i: int, p: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return perms[:i] + (p,) + perms[i + 1:]


def _replace(a: Alignment, **changes) -> Alignment:
    fields = {"residual": a.residual, "mlp": a.mlp, "q_heads": a.q_heads,
              "kv_heads": a.kv_heads}
    return Alignment(**{**fields, **changes})


def weight_matching(ref: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                    shape: BlockShape, *, max_iter: int = 100, seed: int = 0) -> Alignment:
    """The alignment of `other` onto `ref` (state dicts of one Llama-style shape) by weight
    matching: permute_state(other, result, shape) is `other` in `ref`'s basis."""
    m = _Matcher(ref, other, shape)
    steps = [m.solve_residual] + [
        step for layer in range(shape.num_layers)
        for step in (lambda layer=layer: m.solve_mlp(layer),
                     lambda layer=layer: m.solve_heads(layer))]
    rng = random.Random(seed)
    for _ in range(max_iter):
        rng.shuffle(steps)
        if not any([step() for step in steps]):  # a list: every step runs in each pass
            break
    m.current.check(shape)
    return m.current


def aligned_state(ref: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                  shape: BlockShape, **kwargs) -> dict[str, torch.Tensor]:
    """`other` permuted into `ref`'s basis by weight matching."""
    alignment = weight_matching(ref, other, shape, **kwargs)
    return {k: permute_tensor(k, v, alignment, shape) for k, v in other.items()}


__all__ = ["aligned_state", "weight_matching"]
