"""The fused path (CPU, float32): the task-arithmetic family as compiled whole-tensor kernels.

One kernel per tensor (`torch.compile`, inductor's C++ backend) reads each input once and writes
the target: the engine's operations in the engine's order, elementwise, so the same bits
(inductor compiles without floating-point contraction or reassociation). The first run of each
kernel variant is compared with the chunked path; a compile failure (no C++ compiler) or any
difference switches the merger to the chunked path for good, with a warning.
"""

from __future__ import annotations

import os
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from evomerge.merge.engine import TensorJob
from evomerge.merge.inplace.chunked import ChunkedMath, l1_before
from evomerge.merge.inplace.masks import della_table
from evomerge.merge.inplace.memory import Entry
from evomerge.methods.registry import Consensus, TaskArithmeticMerge
from evomerge.methods.sparsify import RescaleMode, Sparsifier, check_della_density

# The compiled whole-tensor kernels (fused=None): on for models of at least FUSED_MIN_PARAMS
# merged parameters (below that, a candidate takes milliseconds and the compile, 5-40 s once per
# process, does not pay off); EVOMERGE_FUSED=1 or 0 turns them on or off for every size.
FUSED_ENV = "EVOMERGE_FUSED"
FUSED_MIN_PARAMS = 1 << 24


# --- the kernels (elementwise over whole tensors) ----------------------------------------------


@dataclass
class FusedInputs:
    """One candidate's per-row mask inputs for the fused kernels (see _sparse_row)."""

    kind: str  # "dense", "rank", "random" or "della"
    aa: list[torch.Tensor | None]  # ranks (rank), uniforms (random, della)
    bb: list[torch.Tensor | None]  # della's ranks along dim 1
    tt: list[torch.Tensor | None]  # k (rank), density (random), probability table (della)
    full: list[bool]  # density >= 1: the row is kept whole
    l1: bool  # the L1 rescale: a first pass writes the masked deltas


def _sparse_row(kind: str, d: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None,
                t: torch.Tensor | None) -> torch.Tensor:
    """sparsify(delta) elementwise, as the engine computes it: delta * mask.to(dtype)."""
    if kind == "dense":
        return d
    assert t is not None
    assert a is not None
    if kind == "kept":  # the L1 pass's |masked delta| with delta's sign, * before / after
        return torch.copysign(a, d) * t  # copysign(|d * m|, d) == d * m, zeros' signs too
    if kind == "della":
        assert b is not None
        keep = a < t[b]  # U < della_probabilities, the table gathered by rank
    else:
        keep = a < t  # rank < k (ties: the first k of the engine's order), or U < density
    return d * keep.to(d.dtype)


def _row_sum(rows: list[torch.Tensor]) -> torch.Tensor:
    """Rows added one by one: the engine's sum(dim=0) where the merger checked that it is."""
    out = rows[0]
    for r in rows[1:]:
        out = out + r
    return out


def _mask_kernel(absolutes: list[torch.Tensor], kind: str, deltas: list[torch.Tensor],
                 aa: list[torch.Tensor | None], bb: list[torch.Tensor | None],
                 tt: list[torch.Tensor | None]) -> None:
    for out, d, a, b, t in zip(absolutes, deltas, aa, bb, tt, strict=True):
        out.copy_(_sparse_row(kind, d, a, b, t).abs())


def _combine_kernel(target: torch.Tensor, base: torch.Tensor, kind: str,
                    deltas: list[torch.Tensor], aa: list[torch.Tensor | None],
                    bb: list[torch.Tensor | None], tt: list[torch.Tensor | None],
                    weights: list[torch.Tensor], consensus: bool, normalize: torch.Tensor,
                    divisor: torch.Tensor, lam: torch.Tensor) -> None:
    """TaskArithmeticMerge.merge elementwise: the same operations in the same order (x / 1.0,
    x * 1.0 and a where() on `normalize` stand for the engine's skipped steps: exact)."""
    w_rows = [_sparse_row(kind, d, a, b, t) * w
              for d, a, b, t, w in zip(deltas, aa, bb, tt, weights, strict=True)]
    mixed = _row_sum(w_rows)
    if consensus:
        majority = (mixed >= 0).to(mixed.dtype) * 2 - 1
        agree = [(torch.sign(x) == majority).to(x.dtype) for x in w_rows]
        mixed = _row_sum([x * m for x, m in zip(w_rows, agree, strict=True)])
        div = _row_sum([w * m for w, m in zip(weights, agree, strict=True)])
        div = div + (div == 0).to(div.dtype)  # divisor[divisor == 0] = 1
        mixed = torch.where(normalize, mixed / div, mixed)
    else:
        mixed = mixed / divisor
    target.copy_(base + mixed * lam)


_KERNELS: dict[tuple, Callable[..., None]] = {}


def _kernel(name: str, fn: Callable[..., None], variant: tuple) -> Callable[..., None]:
    """fn compiled once per process and variant (dynamic shapes: one kernel for every tensor
    size). Each variant compiles a copy of fn with its own code object: dynamo limits the
    graphs per code object (8), and a search's variants (row kinds, consensus, row counts)
    would otherwise share that limit."""
    key = (name, *variant)
    compiled = _KERNELS.get(key)
    if compiled is None:
        copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                                  fn.__defaults__, fn.__closure__)
        compiled = _KERNELS[key] = torch.compile(copy, dynamic=True, fullgraph=True)
    return compiled


# --- running them, checked against the chunked path --------------------------------------------


class FusedKernels:
    """The fused path of one merger: on where it applies, off for good after a failure.

    `fused`: True or False, or None for on with at least FUSED_MIN_PARAMS merged parameters
    (`n_params`) unless EVOMERGE_FUSED=1/0 says otherwise. It applies on CPU in float32 with
    resident placement, to the task-arithmetic family except breadcrumbs*, where adding `rows`
    one by one equals the engine's sum(dim=0) (checked by the chunked path) or there is one row;
    inductor computes bfloat16 and float16 in float32 without rounding between operations.
    """

    def __init__(self, chunked: ChunkedMath, fused: bool | None, *, n_params: int,
                 rows: int) -> None:
        self.chunked = chunked
        if fused is None:
            env = os.environ.get(FUSED_ENV, "")
            fused = env == "1" or (env != "0" and n_params >= FUSED_MIN_PARAMS)
        c = chunked
        self.enabled = fused and c.device.type == "cpu" and c.placement == "resident" \
            and c.dtype == torch.float32 and isinstance(c.method, TaskArithmeticMerge) \
            and c.sparsifier is not Sparsifier.MAGNITUDE_OUTLIERS \
            and (rows == 1 or c.sequential_sum)
        self.checked: set[tuple] = set()  # kernel variants already checked here

    def run(self, e: Entry, job: TensorJob) -> bool:
        """Runs the fused kernels into e.target; False where the chunked path must run instead:
        fused kernels off, inputs they do not cover (see `inputs`), or a compile failure (then
        off for good). A kernel variant's first run is checked against the chunked path, which
        then writes the target either way."""
        if not self.enabled:
            return False
        f = self.inputs(e, job)  # raises the chunked path's ValueErrors
        if f is None:
            return False
        method: TaskArithmeticMerge = self.chunked.method
        consensus = method.consensus is Consensus.SUM
        key = (f.kind, f.l1, consensus, len(e.keys))
        try:
            self.kernels(e, job, f, consensus)
        except Exception as err:  # noqa: BLE001 - no compiler, an inductor limitation, ...
            self.enabled = False
            warnings.warn(f"in-place merger: the fused kernels failed ({type(err).__name__}: "
                          f"{str(err)[:200]}); using the chunked path", stacklevel=4)
            return False
        if key in self.checked:
            return True
        fused = e.target.clone()
        self.chunked.task_arithmetic(e, job)
        if torch.equal(fused, e.target):
            self.checked.add(key)
        else:
            self.enabled = False
            warnings.warn(f"in-place merger: the fused kernel {key} differs from the chunked "
                          f"path on {e.name}; using the chunked path", stacklevel=4)
        return True

    def inputs(self, e: Entry, job: TensorJob) -> FusedInputs | None:
        """Per-row mask inputs for the fused kernels, or None where the chunked path must run
        (zeroed rows, inverse-density rescale, empty tensors)."""
        sp = self.chunked.sparsifier
        shared = job.shared
        rescale = RescaleMode(shared["rescale_mode"]) if shared["rescale"] else None
        if e.numel == 0 or (sp is not None and rescale is RescaleMode.INVERSE_DENSITY):
            return None
        kind = {None: "dense", Sparsifier.MAGNITUDE: "rank", Sparsifier.RANDOM: "random",
                Sparsifier.DELLA_MAGPRUNE: "della"}[sp]
        n = len(e.keys)
        aa: list[torch.Tensor | None] = [None] * n
        bb: list[torch.Tensor | None] = [None] * n
        tt: list[torch.Tensor | None] = [None] * n
        full: list[bool] = [True] * n
        for row, k in enumerate(e.keys):
            if sp is None:
                continue
            params = job.per_source[k]
            density = params.get("density", 1.0)
            if density <= 0:
                return None
            # density >= 1 keeps the delta as it is: a mask that keeps every element does
            # the same (delta * 1.0 == delta), and so does an L1 ratio of 1.0 below.
            full[row] = density >= 1
            if sp is Sparsifier.MAGNITUDE:
                assert e.mag_ranks is not None
                k_top = e.numel if full[row] else max(1, int(density * e.numel))
                aa[row], tt[row] = e.mag_ranks[row], torch.tensor(k_top, dtype=torch.int64)
            elif sp is Sparsifier.RANDOM:
                assert e.uniforms is not None
                aa[row] = e.uniforms[row]
                tt[row] = torch.tensor(2.0 if full[row] else density, dtype=torch.float64)
            else:
                assert e.uniforms is not None and e.ranks is not None
                if full[row]:
                    table = torch.full((e.cols,), 2.0, dtype=torch.float64)
                else:
                    check_della_density(density, params["epsilon"])
                    table = della_table(e.cols, density, params["epsilon"], self.chunked.device)
                aa[row], bb[row], tt[row] = e.uniforms[row], e.ranks[row], table
        l1 = sp is not None and rescale is RescaleMode.L1
        return FusedInputs(kind, aa, bb, tt, full, l1)

    def kernels(self, e: Entry, job: TensorJob, f: FusedInputs, consensus: bool) -> None:
        """The kernels for one tensor: with the L1 rescale, the mask kernel, torch's sums and
        the combining kernel; without it, the combining kernel alone."""
        n = len(e.keys)
        shared = job.shared
        dt = self.chunked.dtype
        deltas: list[torch.Tensor] = list(e.inputs.unbind(0))
        kind, tt = f.kind, list(f.tt)
        aa, bb = list(f.aa), list(f.bb)
        if f.l1:
            # pass 1: |masked delta| of the whole tensor, for the engine's L1 sum; pass 2
            # rebuilds the masked delta as copysign(|masked|, delta) (the same bits)
            one = torch.ones((), dtype=dt)
            absolutes = list(self.chunked.full_buffers(dt, n)[1][:, : e.numel].unbind(0))
            _kernel("mask", _mask_kernel, (kind, n))(absolutes, kind, deltas, aa, bb, tt)
            for row in range(n):
                absolute = absolutes[row]
                ratio = one
                if not f.full[row]:  # sparsify._apply_mask's L1 matching and guard
                    after = absolute.view(e.shape).sum()
                    before = l1_before(e, row, deltas[row], False)
                    if not (before < 1e-7 or after < 1e-7):
                        ratio = before / after
                aa[row], tt[row] = absolute, ratio
            kind, bb = "kept", [None] * n
        weights = torch.tensor([job.per_source[k]["weight"] for k in e.keys], dtype=dt)
        divisor = torch.ones(1, dtype=dt)
        if not consensus and shared["normalize"]:
            divisor = weights.reshape(n, 1).sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        _kernel("combine", _combine_kernel, (kind, consensus, n))(
            e.target, e.base, kind, deltas, aa, bb, tt, list(weights.unbind(0)), consensus,
            torch.tensor(bool(shared["normalize"])), divisor,
            torch.tensor(shared["lambda"], dtype=dt))


__all__ = ["FUSED_ENV", "FUSED_MIN_PARAMS", "FusedInputs", "FusedKernels"]
