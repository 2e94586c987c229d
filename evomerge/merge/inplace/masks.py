"""The sparsifiers' masks: what is precomputed once per source, and the per-candidate masks.

Precomputed (per tensor and source): the ranks (CPU) or the order (CUDA) of the stable |delta|
sort for ties and breadcrumbs*, della's ranks along dim 1, and the mask uniforms of dare*/della*
for a mask seed. Per candidate: a mask function that writes the mask, as 1.0 / 0.0, of a chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from evomerge.merge.inplace.memory import MAGNITUDE_SPARSIFIERS, Entry, Workspace, index_dtype
from evomerge.methods.sparsify import Sparsifier, della_ranks, uniforms

# mask_fn(out, lo, hi): out = the mask of elements lo..hi-1, as 1.0 / 0.0 in out's dtype
MaskFn = Callable[[torch.Tensor, int, int], None]


def _sort_key(delta: torch.Tensor) -> torch.Tensor:
    # sparsify._sort_key: |x| in float32 (float64 stays), so the order matches the engine's.
    w = delta.abs().reshape(-1)
    return w if w.dtype == torch.float64 else w.float()


def _abs_at(flat: torch.Tensor, index: int) -> float:
    return abs(float(flat[index]))


def _split_compare(a: torch.Tensor, out: torch.Tensor, split: int,
                   before: Callable[..., torch.Tensor], after: Callable[..., torch.Tensor],
                   value: float) -> None:
    """out[:split] = before(a, value), out[split:] = after(a, value) (split clamped to a)."""
    split = max(0, min(split, a.numel()))
    if split > 0:
        before(a[:split], value, out=out[:split])
    if split < a.numel():
        after(a[split:], value, out=out[split:])


# --- precomputed once per source ---------------------------------------------------------------


def precompute(e: Entry, sparsifier: Sparsifier | None, *, on_cpu: bool, host: torch.device,
               place: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Fill e's magnitude ranks or orders (ties, breadcrumbs*) and della ranks from its inputs."""
    n, numel = e.inputs.shape
    if sparsifier in MAGNITUDE_SPARSIFIERS:
        # ties keeps the first k of the stable descending order, breadcrumbs a range of the
        # ascending one. CPU: store each element's rank in that order (the mask is then a
        # comparison of ranks); CUDA: the order on the host (two lookups per cut).
        descending = sparsifier is Sparsifier.MAGNITUDE
        index = index_dtype(numel)
        orders = torch.empty((n, numel), dtype=index)
        for row in range(n):
            key = _sort_key(e.inputs[row])
            order = torch.argsort(key, descending=descending, stable=True).cpu()
            if on_cpu:  # the inverse permutation: rank[order[j]] = j
                orders[row, order] = torch.arange(numel, dtype=index)
            else:
                orders[row] = order
        if on_cpu:
            e.mag_ranks = orders
        else:
            e.orders = orders
    if sparsifier is Sparsifier.DELLA_MAGPRUNE:
        ranks = torch.empty((n, numel), dtype=torch.int32, device=host)
        for row in range(n):
            ranks[row] = della_ranks(e.inputs[row].view(e.shape)).reshape(-1)
        e.ranks = place(ranks)


def fill_uniforms(e: Entry, mask_seed: int, *, host: torch.device,
                  place: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """e's mask uniforms for `mask_seed` (sparsify.uniforms per source and tensor), in place."""
    if e.uniforms is None:
        e.uniforms = place(torch.empty((len(e.keys), e.numel), dtype=torch.float64,
                                       device=host))
    for row, key in enumerate(e.keys):
        e.uniforms[row] = uniforms(mask_seed, f"{key}:{e.name}", (e.numel,), e.uniforms.device)


def della_table(cols: int, density: float, epsilon: float,
                device: torch.device) -> torch.Tensor:
    """della_probabilities for the ranks 0..cols-1, with the engine's float64 operations."""
    r = torch.arange(cols, dtype=torch.float64, device=device)
    rank_norm = r / (cols - 1) if cols > 1 else torch.full_like(r, 0.5)
    return (density - epsilon) + rank_norm * (2 * epsilon)


# --- the masks of one candidate ----------------------------------------------------------------


def topk_mask(e: Entry, row: int, density: float, delta: torch.Tensor,
              ws: Workspace) -> MaskFn:
    """ties: the first k = max(1, int(density * numel)) of the stable descending |delta| order."""
    k = max(1, int(density * e.numel))
    if e.mag_ranks is not None:  # CPU: the first k of the stable descending order
        return rank_mask(e.mag_ranks[row], 0, k, ws)
    # Stable descending order keeps the first k of (-|x|, index): |x| > thr, plus the
    # elements equal to thr up to the index of the k-th kept element.
    assert e.orders is not None
    cut = int(e.orders[row, k - 1])
    thr = _abs_at(e.inputs[row], cut)

    def mask_fn(out: torch.Tensor, lo: int, hi: int) -> None:
        a = ws.a[: hi - lo]
        torch.abs(delta[lo:hi], out=a)
        _split_compare(a, out, cut + 1 - lo, torch.ge, torch.gt, thr)
    return mask_fn


def outlier_mask(e: Entry, row: int, density: float, gamma: float, delta: torch.Tensor,
                 ws: Workspace) -> MaskFn:
    """breadcrumbs: drop the gamma share of the largest |delta| and the smallest ones."""
    # magnitude_outliers keeps ascending stable ranks [n_bot, n_bot + target): bounded below
    # and above by (|x|, index) of two elements of the order.
    n = e.numel
    target = max(0, int(density * n))
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    start, stop = min(n_bot, n), min(n_bot + target, n)
    if e.mag_ranks is not None:  # CPU: ranks start..stop-1 of the stable ascending order
        return rank_mask(e.mag_ranks[row], start, stop, ws)
    assert e.orders is not None
    lower = upper = None
    if start > 0 and stop > start:
        idx = int(e.orders[row, start])
        lower = (idx, _abs_at(e.inputs[row], idx))
    if stop < n and stop > start:
        idx = int(e.orders[row, stop - 1])
        upper = (idx, _abs_at(e.inputs[row], idx))

    def mask_fn(out: torch.Tensor, lo: int, hi: int) -> None:
        if stop <= start:
            out.zero_()
            return
        a = ws.a[: hi - lo]
        torch.abs(delta[lo:hi], out=a)
        if lower is None:
            out.fill_(1)
        else:
            _split_compare(a, out, lower[0] - lo, torch.gt, torch.ge, lower[1])
        if upper is not None:
            tmp = ws.tmp[: hi - lo]
            _split_compare(a, tmp, upper[0] + 1 - lo, torch.le, torch.lt, upper[1])
            out.mul_(tmp)
    return mask_fn


def rank_mask(ranks: torch.Tensor, start: int, stop: int, ws: Workspace) -> MaskFn:
    """mask = start <= rank < stop, as 1.0 / 0.0 (the elements that `mask[order[start:stop]]
    = 1` sets, since rank is the inverse permutation of order)."""

    def mask_fn(out: torch.Tensor, lo: int, hi: int) -> None:
        if stop <= start:
            out.zero_()
            return
        torch.lt(ranks[lo:hi], stop, out=out)
        if start > 0:
            tmp = ws.tmp[: hi - lo]
            torch.ge(ranks[lo:hi], start, out=tmp)
            out.mul_(tmp)
    return mask_fn


def random_mask(u: torch.Tensor, density: float) -> MaskFn:
    """dare: U < density over the source's uniforms."""

    def mask_fn(out: torch.Tensor, lo: int, hi: int) -> None:
        torch.lt(u[lo:hi], density, out=out)
    return mask_fn


def della_mask(e: Entry, u: torch.Tensor, ranks: torch.Tensor, density: float, epsilon: float,
               ws: Workspace, device: torch.device) -> MaskFn:
    """della: U < p, the keep probabilities gathered by rank from a table of `cols` values."""
    # della_probabilities over the `cols` possible ranks, then one gather per element: the
    # same float64 operations on the same values as the engine's whole-tensor computation.
    table = della_table(e.cols, density, epsilon, device)

    def mask_fn(out: torch.Tensor, lo: int, hi: int) -> None:
        p = ws.probs[: hi - lo]
        torch.index_select(table, 0, ranks[lo:hi], out=p)
        torch.lt(u[lo:hi], p, out=out)
    return mask_fn


__all__ = ["MaskFn", "della_mask", "della_table", "fill_uniforms", "outlier_mask", "precompute",
           "random_mask", "rank_mask", "topk_mask"]
