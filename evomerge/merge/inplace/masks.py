"""The sparsifiers' masks: what is precomputed once per source, and the per-candidate masks.

Precomputed (per tensor and source): the order of |delta| that the engine's magnitude
sparsifiers use (`sparsify.magnitude_order`: mergekit's non-stable torch sort, run on the compute
device on the same values, so it is the engine's order), as ranks (CPU) or as the order itself on
the host (CUDA); della's ranks along dim 1; the mask uniforms of dare*/della* for a mask seed.
Per candidate: a mask function that writes the mask, as 1.0 / 0.0, of a chunk.

The threshold masks (CUDA) select exactly the elements order[start:stop] whatever way the sort
split the ties: they compare |delta| with the values at the cut and list the tied elements at
each cut value explicitly (see `_Tied`), so they do not assume index-ordered ties.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from evomerge.merge.inplace.memory import MAGNITUDE_SPARSIFIERS, Entry, Workspace, index_dtype
from evomerge.methods.sparsify import Sparsifier, della_ranks, magnitude_order, uniforms

# mask_fn(out, lo, hi): out = the mask of elements lo..hi-1, as 1.0 / 0.0 in out's dtype
MaskFn = Callable[[torch.Tensor, int, int], None]


def _abs_at(flat: torch.Tensor, index: int) -> float:
    return abs(float(flat[index]))


def _count(delta: torch.Tensor, ws: Workspace, op: Callable[..., torch.Tensor],
           value: float) -> int:
    """How many elements of |delta| satisfy op(|x|, value), in chunks of the workspace's size."""
    total, c = 0, ws.a.numel()
    for lo in range(0, delta.numel(), c):
        a = ws.a[: min(c, delta.numel() - lo)]
        torch.abs(delta[lo : lo + a.numel()], out=a)
        total += int(torch.count_nonzero(op(a, value)))
    return total


@dataclass(frozen=True)
class _Tied:
    """The elements whose |x| equals `value`, of which the order keeps a part.

    They occupy positions [run_lo, run_hi) of the order (the order is sorted by |x|), and the
    kept ones are those at [keep_lo, keep_hi). `index` lists (sorted) the kept ones when they are
    fewer than the dropped ones (keep=True), else the dropped ones (keep=False): at most half
    of the run is listed.
    """

    value: float
    keep: bool
    index: torch.Tensor

    @staticmethod
    def make(order: torch.Tensor, value: float, run: tuple[int, int], kept: tuple[int, int],
             device: torch.device) -> _Tied:
        (run_lo, run_hi), (keep_lo, keep_hi) = run, kept
        keep_lo, keep_hi = max(keep_lo, run_lo), min(keep_hi, run_hi)
        n_kept = max(0, keep_hi - keep_lo)
        if n_kept <= (run_hi - run_lo) - n_kept:
            index = order[keep_lo:keep_hi] if n_kept else order[:0]
            keep = True
        else:
            index = torch.cat([order[run_lo:keep_lo], order[keep_hi:run_hi]])
            keep = False
        return _Tied(value, keep, torch.sort(index.to(device=device, dtype=torch.int64)).values)

    def apply(self, a: torch.Tensor, out: torch.Tensor, lo: int, hi: int, numel: int,
              tmp: torch.Tensor) -> None:
        """Add this value's kept elements of chunk [lo, hi) to `out` (which has none of them)."""
        index = self.index
        if lo > 0 or hi < numel:  # the listed elements inside the chunk
            bounds = torch.searchsorted(index, torch.tensor([lo, hi], device=index.device))
            index = index[int(bounds[0]) : int(bounds[1])]
        if not self.keep:
            torch.eq(a, self.value, out=tmp)
            out.add_(tmp)
        if index.numel():
            out.index_fill_(0, index - lo, 1.0 if self.keep else 0.0)


# --- precomputed once per source ---------------------------------------------------------------


def precompute(e: Entry, sparsifier: Sparsifier | None, *, on_cpu: bool, host: torch.device,
               place: Callable[[torch.Tensor], torch.Tensor],
               device: torch.device | None = None) -> None:
    """Fill e's magnitude ranks or orders (ties, breadcrumbs*) and della ranks from its inputs.

    `device` is where the merge computes (default: CPU if on_cpu, else CUDA): the order is sorted
    there, as the engine sorts on its device, so that ties fall the same way (stream placement
    keeps the inputs on the host but sorts on the device).
    """
    n, numel = e.inputs.shape
    if sparsifier in MAGNITUDE_SPARSIFIERS:
        # ties keeps the first k of the descending order, breadcrumbs a range of the ascending
        # one. CPU: store each element's rank in that order (the mask is then a comparison of
        # ranks); CUDA: the order on the host (value thresholds plus the tied elements listed).
        descending = sparsifier is Sparsifier.MAGNITUDE
        compute = device or torch.device("cpu" if on_cpu else "cuda")
        index = index_dtype(numel)
        orders = torch.empty((n, numel), dtype=index)
        for row in range(n):
            order = magnitude_order(e.inputs[row].to(compute), descending).cpu()
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
    """ties: the first k = max(1, int(density * numel)) of the descending |delta| order."""
    k = max(1, int(density * e.numel))
    if e.mag_ranks is not None:  # CPU: ranks below k
        return rank_mask(e.mag_ranks[row], 0, k, ws)
    # order[:k] = every |x| > thr, plus those tied at thr that the order puts before k; thr's
    # run in the order is [count(|x| > thr), count(|x| >= thr)).
    assert e.orders is not None
    order = e.orders[row]
    thr = _abs_at(e.inputs[row], int(order[k - 1]))
    run = (_count(delta, ws, torch.gt, thr), _count(delta, ws, torch.ge, thr))
    tied = _Tied.make(order, thr, run, (0, k), delta.device)

    def mask_fn(out: torch.Tensor, lo: int, hi: int) -> None:
        a = ws.a[: hi - lo]
        torch.abs(delta[lo:hi], out=a)
        torch.gt(a, thr, out=out)
        tied.apply(a, out, lo, hi, e.numel, ws.tmp[: hi - lo])
    return mask_fn


def outlier_mask(e: Entry, row: int, density: float, gamma: float, delta: torch.Tensor,
                 ws: Workspace) -> MaskFn:
    """breadcrumbs: drop the gamma share of the largest |delta| and the smallest ones."""
    # magnitude_outliers keeps positions [n_bot, n_bot + target) of the ascending order.
    n = e.numel
    target = max(0, int(density * n))
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    start, stop = min(n_bot, n), min(n_bot + target, n)
    if e.mag_ranks is not None:  # CPU: ranks start..stop-1
        return rank_mask(e.mag_ranks[row], start, stop, ws)
    if stop <= start:
        return lambda out, lo, hi: out.zero_()
    # order[start:stop] = every lo_v < |x| < hi_v, plus the tied elements at lo_v and at hi_v
    # that the order puts inside [start, stop); v's run is [count(|x| < v), count(|x| <= v)).
    assert e.orders is not None
    order = e.orders[row]
    lo_v = _abs_at(e.inputs[row], int(order[start]))
    hi_v = _abs_at(e.inputs[row], int(order[stop - 1]))
    tied = [_Tied.make(order, v, (_count(delta, ws, torch.lt, v), _count(delta, ws, torch.le, v)),
                       (start, stop), delta.device)
            for v in dict.fromkeys((lo_v, hi_v))]

    def mask_fn(out: torch.Tensor, lo: int, hi: int) -> None:
        a = ws.a[: hi - lo]
        torch.abs(delta[lo:hi], out=a)
        tmp = ws.tmp[: hi - lo]
        if lo_v == hi_v:
            out.zero_()
        else:  # strictly between the two cut values
            torch.gt(a, lo_v, out=out)
            torch.lt(a, hi_v, out=tmp)
            out.mul_(tmp)
        for t in tied:
            t.apply(a, out, lo, hi, n, tmp)
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
