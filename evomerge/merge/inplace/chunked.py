"""The chunked path: the engine's torch operations per tensor, over chunks of the flat tensors.

Elementwise operations and the reductions over the source axis do not depend on the chunking;
the whole-tensor L1 norms of `rescale` are computed on full tensors as the engine does, so the
target gets the engine's bits. Every method and dtype, on CPU and CUDA, runs this way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from evomerge.merge.engine import TensorJob
from evomerge.merge.inplace.masks import (
    MaskFn,
    della_mask,
    outlier_mask,
    random_mask,
    topk_mask,
)
from evomerge.merge.inplace.memory import (
    RANDOM_SPARSIFIERS,
    Entry,
    Placement,
    Workspace,
    make_workspace,
    work_dtype,
)
from evomerge.methods.registry import Consensus, TaskArithmeticMerge
from evomerge.methods.sparsify import RescaleMode, Sparsifier, check_della_density


def sequential_sum_is_exact(rows: int, dtype: torch.dtype) -> bool:
    """Whether (x0 + x1) + x2 ... equals torch.sum(x, dim=0) bit for bit here (float32 and
    float64 on CPU: yes; bfloat16/float16 accumulate in float32 inside the reduction: no)."""
    if rows < 2 or dtype not in (torch.float32, torch.float64):
        return False
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, 4099, generator=g, dtype=torch.float64)
         * torch.logspace(-3, 3, rows, dtype=torch.float64)[:, None]).to(dtype)
    seq = x[0] + x[1]
    for row in range(2, rows):
        seq += x[row]
    return torch.equal(seq, x.sum(dim=0))


def l1_before(e: Entry, row: int, delta: torch.Tensor, work: bool) -> torch.Tensor:
    """|delta|.sum() over the whole tensor, as _apply_mask computes it; cached per source."""
    if row not in e.l1:
        t = delta.view(e.shape)
        e.l1[row] = (t.float() if work else t).abs().sum()
    return e.l1[row]


class Row:
    """One source's sparsified delta for one candidate, filled chunk by chunk."""

    def __init__(self, ws: Workspace, delta: torch.Tensor, kind: str, *,
                 mask_fn: MaskFn | None = None, density: float = 1.0,
                 rescale: RescaleMode | None = None, work: bool = False,
                 before: torch.Tensor | None = None) -> None:
        self.ws = ws
        self.delta = delta
        self.kind = kind  # "dense", "zero" or "mask"
        self.mask_fn = mask_fn
        self.density = density
        self.rescale = rescale
        self.work = work  # float16: mask and rescale in float32, as sparsify.random does
        self.before = before
        self.ratio: torch.Tensor | None = None
        self.kept: torch.Tensor | None = None  # the whole masked delta, from the L1 pass

    @property
    def needs_l1(self) -> bool:
        return self.kind == "mask" and self.rescale is RescaleMode.L1

    def work_chunk(self, lo: int, hi: int) -> torch.Tensor:
        if not self.work:
            return self.delta[lo:hi]
        buf = self.ws.work[: hi - lo]
        buf.copy_(self.delta[lo:hi])
        return buf

    def masked(self, lo: int, hi: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """delta[lo:hi] * mask in the work dtype, as _apply_mask starts (into `out` if the
        work dtype is the dtype, else into a workspace view)."""
        assert self.mask_fn is not None
        ws = self.ws
        if self.kept is not None:  # computed by the L1 pass
            return self.kept[lo:hi]
        mask = (ws.mask_work if self.work else ws.mask)[: hi - lo]
        self.mask_fn(mask, lo, hi)
        if out is None or (self.work and out.dtype != mask.dtype):
            out = ws.work[: hi - lo] if self.work else ws.tmp[: hi - lo]
        torch.mul(self.work_chunk(lo, hi), mask, out=out)
        return out

    def fill(self, out: torch.Tensor, lo: int, hi: int) -> None:
        """out = sparsify(delta)[lo:hi] in the delta's dtype (before the weight is applied)."""
        if self.kind == "dense":
            out.copy_(self.delta[lo:hi])
            return
        if self.kind == "zero":
            out.zero_()
            return
        masked = self.masked(lo, hi, out)
        # sparsify._apply_mask: tensor * mask, then / density or * (before / after)
        if self.rescale is RescaleMode.INVERSE_DENSITY:
            masked.div_(self.density)
        elif self.rescale is RescaleMode.L1 and self.ratio is not None:
            if masked.dtype == out.dtype:
                torch.mul(masked, self.ratio, out=out)
                return
            masked.mul_(self.ratio)
        if masked is not out:
            out.copy_(masked)


class ChunkedMath:
    """Writes one tensor's merge into its entry's target, chunk by chunk, with the workspaces.

    `rows` and `largest` size the workspaces (the most rows of a tensor, its largest numel);
    `chunk` is the chunk in elements; `staging` holds the "stream" placement's device buffers.
    """

    def __init__(self, method: Any, *, device: torch.device, dtype: torch.dtype, rows: int,
                 largest: int, chunk: int, placement: Placement,
                 staging: dict[str, torch.Tensor]) -> None:
        self.method = method
        self.sparsifier: Sparsifier | None = getattr(method, "sparsifier", None)
        self.device = device
        self.dtype = dtype
        self.chunk = chunk
        self.largest = largest
        self.placement = placement
        self.staging = staging
        self.ws = make_workspace(rows, chunk, device, dtype)
        self.sequential_sum = device.type != "cuda" and sequential_sum_is_exact(rows, dtype)

    def chunks(self, numel: int) -> range:
        return range(0, numel, self.chunk)

    def sum_rows(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """torch.sum(x, dim=0, out=out); on CPU as row additions when those give the same bits
        (checked at construction): they are cheaper than the strided reduction."""
        if not self.sequential_sum or x.shape[0] < 2:
            torch.sum(x, dim=0, out=out)
            return
        torch.add(x[0], x[1], out=out)
        for row in range(2, x.shape[0]):
            out.add_(x[row])

    def stage(self, e: Entry) -> tuple[torch.Tensor, torch.Tensor | None,
                                       torch.Tensor | None, torch.Tensor | None]:
        """(inputs, base, uniforms, ranks) on the device; "stream" copies them there first."""
        if self.placement == "resident":
            return e.inputs, e.base, e.uniforms, e.ranks
        n, numel = e.inputs.shape
        out: list[torch.Tensor | None] = []
        for key, src in (("inputs", e.inputs), ("base", e.base), ("uniforms", e.uniforms),
                         ("ranks", e.ranks)):
            if src is None:
                out.append(None)
                continue
            buf = self.staging[key]
            view = buf[:n, :numel] if src.dim() == 2 else buf[:numel]
            view.copy_(src, non_blocking=True)
            out.append(view)
        return out[0], out[1], out[2], out[3]  # type: ignore[return-value]

    # --- linear ----------------------------------------------------------------------------

    def linear(self, e: Entry, job: TensorJob) -> None:
        # LinearMerge.merge: float32 (float64) accumulation with addcmul_, then / sum(w).
        inputs, _, _, _ = self.stage(e)
        acc_dtype = self.ws.acc.dtype
        weights = torch.tensor([job.per_source[k]["weight"] for k in e.keys], dtype=acc_dtype)
        ws = [w.to(self.device) for w in weights.unbind(0)]
        denominator = None
        if job.shared["normalize"]:
            denominator = weights.sum()
            if denominator == 0:
                raise ValueError(f"linear: the weights sum to 0 for {e.name} (normalize: true)")
            denominator = denominator.to(self.device)
        in_target = e.target.dtype == acc_dtype
        for lo in self.chunks(e.numel):
            hi = min(lo + self.chunk, e.numel)
            acc = e.target[lo:hi] if in_target else self.ws.acc[: hi - lo]
            acc.zero_()
            for row, w in enumerate(ws):
                acc.addcmul_(inputs[row, lo:hi], w)
            if denominator is not None:
                acc.div_(denominator)
            if not in_target:
                e.target[lo:hi].copy_(acc)

    # --- the task-arithmetic family --------------------------------------------------------

    def task_arithmetic(self, e: Entry, job: TensorJob) -> None:
        method: TaskArithmeticMerge = self.method
        inputs, base, uniforms_, ranks = self.stage(e)
        assert base is not None
        n = len(e.keys)
        shared = job.shared
        rescale = RescaleMode(shared["rescale_mode"]) if shared["rescale"] else None
        rows = [self.row_plan(e, row, job.per_source[k], rescale, inputs, uniforms_, ranks)
                for row, k in enumerate(e.keys)]
        if rescale is RescaleMode.L1 and any(r.needs_l1 for r in rows):
            self.l1_pass(e, rows)
        weights = torch.tensor([job.per_source[k]["weight"] for k in e.keys], dtype=self.dtype,
                               device=self.device).reshape(n, 1)
        consensus = method.consensus is Consensus.SUM
        divisor = None
        if not consensus:
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        normalize, lam = shared["normalize"], shared["lambda"]
        ws = self.ws
        for lo in self.chunks(e.numel):
            hi = min(lo + self.chunk, e.numel)
            c = hi - lo
            w = ws.w[:n, :c]
            if all(r.kind == "dense" for r in rows):
                torch.mul(inputs[:, lo:hi], weights, out=w)
            else:
                for row, r in enumerate(rows):
                    r.fill(w[row], lo, hi)
                w.mul_(weights)
            mixed = ws.sums[:c]
            if consensus:
                self.sum_rows(w, mixed)
                maj = ws.maj[:c]
                torch.ge(mixed, 0, out=maj)
                maj.mul_(2).sub_(1)  # (sum >= 0).to(dtype) * 2 - 1
                sgn, agree, prod = ws.sgn[:n, :c], ws.agree[:n, :c], ws.prod[:n, :c]
                torch.sign(w, out=sgn)
                torch.eq(sgn, maj, out=agree)  # pruned zeros have sign 0: never counted
                torch.mul(w, agree, out=prod)
                self.sum_rows(prod, mixed)
                div = ws.div[:c]
                torch.mul(weights, agree, out=prod)
                self.sum_rows(prod, div)
                zero = ws.tmp[:c]
                torch.eq(div, 0, out=zero)
                div.add_(zero)  # divisor[divisor == 0] = 1, exactly: 0 + 1 and x + 0
            else:
                self.sum_rows(w, mixed)
                div = divisor
            if normalize:
                mixed.div_(div)
            if lam != 1:
                mixed.mul_(lam)
            torch.add(base[lo:hi], mixed, out=e.target[lo:hi])

    def row_plan(self, e: Entry, row: int, params: Mapping[str, Any],
                 rescale: RescaleMode | None, inputs: torch.Tensor,
                 uniforms_: torch.Tensor | None, ranks: torch.Tensor | None) -> Row:
        """How one source's delta is sparsified for this candidate (sparsify.sparsify's cases)."""
        sp = self.sparsifier
        density = params.get("density", 1.0)
        delta = inputs[row]
        if sp is None or density >= 1:
            return Row(self.ws, delta, "dense")
        if density <= 0 or e.numel == 0:  # nothing kept (and no rescale divides by the density)
            return Row(self.ws, delta, "zero")
        if sp is Sparsifier.MAGNITUDE_OUTLIERS:
            mask_fn = outlier_mask(e, row, density, params["gamma"], delta, self.ws)
        elif sp is Sparsifier.MAGNITUDE:
            mask_fn = topk_mask(e, row, density, delta, self.ws)
        elif sp is Sparsifier.RANDOM:
            assert uniforms_ is not None
            mask_fn = random_mask(uniforms_[row], density)
        else:
            check_della_density(density, params["epsilon"])
            assert uniforms_ is not None and ranks is not None
            mask_fn = della_mask(e, uniforms_[row], ranks[row], density, params["epsilon"],
                                 self.ws, self.device)
        # magnitude sparsifiers mask in the delta's dtype; random ones in the work dtype
        work = sp in RANDOM_SPARSIFIERS and work_dtype(self.dtype) != self.dtype
        return Row(self.ws, delta, "mask", mask_fn=mask_fn, density=density, rescale=rescale,
                   work=work, before=l1_before(e, row, delta, work)
                   if rescale is RescaleMode.L1 else None)

    def l1_pass(self, e: Entry, rows: list[Row]) -> None:
        """`masked.abs().sum()` needs the whole masked tensor: write it once, then sum it."""
        for row, r in enumerate(rows):
            if not r.needs_l1:
                continue
            # the random sparsifiers norm float16 in float32, the magnitude ones in the dtype
            dtype = work_dtype(self.dtype) if r.work else self.dtype
            abs_buf, kept_buf = self.full_buffers(dtype, len(e.keys))
            full, kept = abs_buf[: e.numel], kept_buf[row, : e.numel]
            for lo in self.chunks(e.numel):
                hi = min(lo + self.chunk, e.numel)
                masked = r.masked(lo, hi, kept[lo:hi])
                torch.abs(masked, out=full[lo:hi])
            r.kept = kept
            after = full.view(e.shape).sum()
            before = r.before
            assert before is not None
            if before < 1e-7 or after < 1e-7:  # mergekit's guard
                r.ratio = None
            else:
                r.ratio = before / after

    def full_buffers(self, dtype: torch.dtype, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The L1 buffers in `dtype` ([M], [n, M]), allocated the first time they are needed."""
        if dtype not in self.ws.full:
            self.ws.full[dtype] = (
                torch.empty(self.largest, dtype=dtype, device=self.device),
                torch.empty((n, self.largest), dtype=dtype, device=self.device))
        return self.ws.full[dtype]


__all__ = ["ChunkedMath", "Row", "l1_before", "sequential_sum_is_exact"]
