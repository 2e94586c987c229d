"""The in-place merger's low-rank path: LoRA adapters kept as their factors, never dense.

When every source of a task_arithmetic or linear merger is a LoRA adapter of the base (the base
itself may be a linear source), a candidate's merged tensor is

    target = beta * base + [c_1 s_1 B_1 | ... | c_n s_n B_n] @ [A_1; ...; A_n]

(c_i the candidate's per-tensor coefficient: lambda * w_i, divided by sum w_i when normalize;
beta 1, or for linear sum_i w_i / divisor), one ``addmm`` into the target. Resident: the target,
the base, and per targeted tensor the stacked A [R, in] and the factors s_i B_i [out, r_i]: a few
hundred MB where dense task vectors of a 7B model take 28 GB each in float32. The only dense
tensor formed is the target itself. Untargeted tensors are beta * base.

The other methods (ties, dare_*, breadcrumbs*, della*, the whole-tensor methods) need each
source's dense delta, ranked or masked as a whole: they take the merger's dense path (adapters
read as base + s B @ A, models/adapters.py). The values equal the engine's up to float rounding
(the engine forms x_i - base from the dense model, this path forms s_i B_i A_i directly): in
float32, |difference| <= 1e-6 on the zoo (tests/test_lora_inplace.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

LOW_RANK_METHODS = ("task_arithmetic", "linear", "lorahub")


def coefficients(method: str, weights: Mapping[int, float], shared: Mapping[str, Any],
                 where: str) -> tuple[dict[int, float], float]:
    """(c_k per source key, beta): merged = beta * base + sum_k c_k * delta_k, as the engine's
    task_arithmetic (divisor: sum w, 1 when |sum| < 1e-8) or linear (sum w; error when 0)."""
    total = sum(weights.values())
    if method == "task_arithmetic":
        div = total if shared["normalize"] and abs(total) >= 1e-8 else 1.0
        lam = shared["lambda"]
        return {k: lam * w / div for k, w in weights.items()}, 1.0
    if shared["normalize"]:
        if total == 0:
            raise ValueError(f"linear: the weights sum to 0 for {where} (normalize: true)")
        return {k: w / total for k, w in weights.items()}, 1.0
    return dict(weights), total


def applies(method_name: str, sources: Mapping[str, Any], base_model: str | None) -> bool:
    """Whether the low-rank path builds this merger's candidates: task_arithmetic or linear,
    and every source an adapter of the base (linear: or the base itself)."""
    from evomerge.models.sources import AdapterSource

    if method_name not in LOW_RANK_METHODS:
        return False
    base_src = sources.get(base_model) if base_model else None
    adapters = [s for s in sources.values() if isinstance(s, AdapterSource)]
    if not adapters:
        return False
    base_path = adapters[0].base_source.path.resolve()
    for s in sources.values():
        if isinstance(s, AdapterSource):
            if s.base_source.path.resolve() != base_path or s.adapter.config.fan_in_fan_out:
                return False
        elif s.path.resolve() != base_path or (method_name != "linear" and s is not base_src):
            return False
    return True


@dataclass
class LowRankEntry:
    name: str
    target: torch.Tensor  # the model's parameter (its own shape)
    base: torch.Tensor  # same shape, resident
    keys: tuple[int, ...]  # source keys whose delta may be non-zero (adapters), in order
    scaled_b: dict[int, torch.Tensor]  # key -> s_k * B_k [out, r_k] (targeted keys only)
    a_cat: torch.Tensor | None  # [R, in]: the A_k of the targeted keys, stacked
    b_cat: torch.Tensor | None  # [out, R] workspace: c_k s_k B_k per candidate
    all_keys: tuple[int, ...]  # every source key of the job (linear's weights)
    hub: tuple[torch.Tensor, torch.Tensor] | None = None  # lorahub: [out, r], [r, in] workspaces


def make_entry(job, plan, target: torch.Tensor, *, dtype: torch.dtype, device: torch.device,
               stack) -> LowRankEntry:
    """Reads the base tensor and the adapters' factors of one job (no dense delta)."""
    from evomerge.merge.engine import plan_source
    from evomerge.models.sources import AdapterSource

    base_t = None
    scaled_b: dict[int, torch.Tensor] = {}
    a_parts: list[torch.Tensor] = []
    keys = []
    for k, (model, name) in enumerate(zip(job.models, job.inputs, strict=True)):
        src = plan_source(plan, model)
        if isinstance(src, AdapterSource):
            if base_t is None:
                base_t = src.base_source.read(name, stack)
            keys.append(k)
            f = src.lora(name)
            if f is not None:
                scaled_b[k] = (f.b.to(dtype) * f.scaling).to(device)
                a_parts.append(f.a.to(dtype).to(device))
        elif base_t is None:
            base_t = src.read(name, stack)
    assert base_t is not None
    base = base_t.to(device=device, dtype=dtype if base_t.is_floating_point() else base_t.dtype)
    a_cat = torch.cat(a_parts, dim=0).contiguous() if a_parts else None
    b_cat = (torch.empty((target.shape[0], a_cat.shape[0]), dtype=dtype, device=device)
             if a_cat is not None else None)
    return LowRankEntry(name=job.name, target=target, base=base, keys=tuple(keys),
                        scaled_b=scaled_b, a_cat=a_cat, b_cat=b_cat,
                        all_keys=tuple(range(len(job.models))))


def build(e: LowRankEntry, job, method: str) -> None:
    """Writes one candidate's merged tensor into the target: one addmm, no dense delta."""
    if not e.base.is_floating_point():
        e.target.copy_(e.base)
        return
    if method == "lorahub":
        _lorahub(e, job)
        return
    keys = e.keys if method == "task_arithmetic" else e.all_keys
    weights = {k: job.per_source[k]["weight"] for k in keys if k != job.base
               or method == "linear"}
    coef, beta = coefficients(method, weights, job.shared, job.name)
    if e.a_cat is None:
        if beta == 1.0:
            e.target.copy_(e.base)
        else:
            torch.mul(e.base, beta, out=e.target)
        return
    col = 0
    for k in e.keys:
        b = e.scaled_b.get(k)
        if b is None:
            continue
        torch.mul(b, coef[k], out=e.b_cat[:, col:col + b.shape[1]])
        col += b.shape[1]
    torch.addmm(e.base, e.b_cat, e.a_cat, beta=beta, out=e.target)


def _lorahub(e: LowRankEntry, job) -> None:
    """LoraHub's composition: base + (sum w_k s_k B_k) @ (sum w_k A_k) (methods/lorahub.py)."""
    present = [k for k in e.keys if k in e.scaled_b]
    if not present:
        e.target.copy_(e.base)
        return
    if len(present) != len(e.keys):
        raise ValueError(f"lorahub: only some adapters target {e.name}; LoraHub composes "
                         "adapters of the same modules")
    ranks = {e.scaled_b[k].shape[1] for k in present}
    if len(ranks) != 1:
        raise ValueError(f"lorahub: the adapters of {e.name} have ranks {sorted(ranks)}; LoraHub "
                         "sums their factors, so they need one rank")
    r = ranks.pop()
    if e.hub is None:
        e.hub = (torch.empty((e.target.shape[0], r), dtype=e.base.dtype, device=e.base.device),
                 torch.empty((r, e.a_cat.shape[1]), dtype=e.base.dtype, device=e.base.device))
    b, a = e.hub
    b.zero_()
    a.zero_()
    for i, k in enumerate(present):
        w = job.per_source[k]["weight"]
        b.add_(e.scaled_b[k], alpha=w)
        a.add_(e.a_cat[i * r:(i + 1) * r], alpha=w)
    torch.addmm(e.base, b, a, out=e.target)


def resident_bytes(sources, dtype: torch.dtype) -> int:
    """Bytes of the adapters' factors the low-rank path keeps (A and s*B, and the B workspace)."""
    from evomerge.models.sources import AdapterSource

    adapters = [s for s in sources if isinstance(s, AdapterSource)]
    if not adapters:
        return 0
    element = torch.empty((), dtype=dtype).element_size()
    return factor_bytes_from_shapes(adapters[0].shapes, [a.adapter.ranks for a in adapters],
                                    element)


def factor_bytes_from_shapes(shapes: Mapping[str, tuple[int, ...]],
                             ranks: list[Mapping[str, int]], element: int) -> int:
    """The same count from shapes alone (benchmarks): per adapter r * (in + out), plus the
    [out, sum r] workspace per targeted tensor."""
    total, summed = 0, {}
    for adapter in ranks:
        for name, r in adapter.items():
            out_f, in_f = shapes[name][0], shapes[name][1]
            total += r * (in_f + out_f)
            summed[name] = summed.get(name, 0) + r
    total += sum(r * shapes[n][0] for n, r in summed.items())
    return total * element
