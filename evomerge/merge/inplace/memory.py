"""What the in-place merger holds in memory, and the plan that counts it before anything loads.

The per-tensor resident entries, the chunk workspaces and the stream staging buffers are defined
(and allocated) here, next to `memory_plan_from_shapes`, the formula that counts their bytes; `plan`
applies it to model folders from config.json and the safetensors headers only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from evomerge.merge.engine import DTYPES, _dtype_name
from evomerge.methods.registry import LinearMerge, TaskArithmeticMerge, get_method
from evomerge.methods.sparsify import Sparsifier
from evomerge.models.sources import load_source
from evomerge.recipes.parameter_space import Recipe

Placement = Literal["resident", "stream"]
PLACEMENTS = ("resident", "stream")
CPU_CHUNK = 1 << 17  # elements per chunk on CPU: a chunk's workspaces stay in the L2/L3 caches
MAGNITUDE_SPARSIFIERS = (Sparsifier.MAGNITUDE, Sparsifier.MAGNITUDE_OUTLIERS)
RANDOM_SPARSIFIERS = (Sparsifier.RANDOM, Sparsifier.DELLA_MAGPRUNE)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    # The random sparsifiers mask float16 deltas in float32 (sparsify._work_dtype).
    return torch.float32 if dtype == torch.float16 else dtype


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def is_whole(method: Any) -> bool:
    """Methods the merger builds per whole tensor with the method's own function (slerp, ...,
    passthrough): their math needs whole-tensor norms, angles, quantiles or top-k."""
    return not isinstance(method, LinearMerge | TaskArithmeticMerge)


def check_supported(method: Any) -> None:
    if not hasattr(method, "merge"):
        raise ValueError(f"the in-place merger cannot build {method!r}")


def probe_recipe(models: Sequence[str], base_model: str | None, method: str,
                 tokenizer_source: str | None, dtype: torch.dtype | str) -> Recipe:
    """A recipe over the merger's sources, used to index and check them (weights are dummies)."""
    if not models:
        raise ValueError("the in-place merger needs at least one model")
    m = get_method(method)
    check_supported(m)
    dummies = {float: 1.0, int: 1, bool: False}
    return Recipe.from_dict({
        "merge_method": method,
        "base_model": base_model,
        "models": [{"model": str(m)} for m in models],
        "parameters": {p.name: dummies.get(p.kind, p.choices[0] if p.choices else "")
                       for p in m.params if p.required},
        "tokenizer_source": tokenizer_source,
        "dtype": _dtype_name(dtype),
    }, "<in-place merger>")


# --- what is held ------------------------------------------------------------------------------


@dataclass
class Entry:
    """What one output tensor needs, resident; `inputs` rows are in the slices' source order."""

    name: str
    shape: torch.Size
    numel: int
    cols: int  # della: the length of a row along dim 1
    target: torch.Tensor  # flat view of the model's parameter
    inputs: torch.Tensor  # [n, N]: task vectors, or linear's sources
    keys: tuple[int, ...]  # group key (slice source index) of each input row
    base: torch.Tensor | None = None  # [N] (task-arithmetic family)
    orders: torch.Tensor | None = None  # host [n, N] (CUDA): the engine's order of |delta| (sparsify.magnitude_order)
    mag_ranks: torch.Tensor | None = None  # [n, N] (CPU): each element's position in it
    ranks: torch.Tensor | None = None  # [n, N] int32: della ranks of |delta| along dim 1
    uniforms: torch.Tensor | None = None  # [n, N] float64 for the merger's mask seed
    l1: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> |delta|.abs().sum()


@dataclass
class Workspace:
    """Chunk-sized scratch buffers, allocated once (views of them are used per chunk)."""

    w: torch.Tensor  # [n, C] weighted, sparsified deltas
    prod: torch.Tensor  # [n, C]
    sgn: torch.Tensor  # [n, C]
    agree: torch.Tensor  # [n, C] 1.0 where a delta agrees with the elected sign
    a: torch.Tensor  # [C] |delta|
    mask: torch.Tensor  # [C] 1.0 / 0.0 in the dtype (magnitude sparsifiers)
    mask_work: torch.Tensor  # [C] 1.0 / 0.0 in the work dtype (random sparsifiers)
    work: torch.Tensor  # [C] work dtype (float16 deltas masked in float32)
    sums: torch.Tensor  # [C]
    maj: torch.Tensor  # [C]
    div: torch.Tensor  # [C]
    tmp: torch.Tensor  # [C]
    acc: torch.Tensor  # [C] linear's float32 (float64) accumulator
    probs: torch.Tensor  # [C] float64 della keep probabilities
    # by dtype: ([M] |masked delta| for whole-tensor L1 norms, [n, M] masked deltas kept from
    # the L1 pass), allocated when a recipe first asks for an L1 rescale
    full: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def make_workspace(n: int, c: int, device: torch.device, dt: torch.dtype) -> Workspace:
    """The workspaces for up to n rows and chunks of c elements."""
    acc = torch.float64 if dt == torch.float64 else torch.float32

    def empty(*shape: int, dtype: torch.dtype = dt) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    # Masks are float 1.0 / 0.0 like the engine's `.to(dtype)` masks: comparisons that
    # write floats and float multiplications vectorize, bool tensors do not.
    return Workspace(
        w=empty(n, c), prod=empty(n, c), sgn=empty(n, c), agree=empty(n, c), a=empty(c),
        mask=empty(c), mask_work=empty(c, dtype=work_dtype(dt)),
        work=empty(c, dtype=work_dtype(dt)), sums=empty(c), maj=empty(c), div=empty(c),
        tmp=empty(c), acc=empty(c, dtype=acc), probs=empty(c, dtype=torch.float64),
    )


def make_staging(n: int, m: int, device: torch.device, dtype: torch.dtype, ta: bool,
                 sparsifier: Sparsifier | None) -> dict[str, torch.Tensor]:
    """"stream" placement: device buffers for the largest tensor's inputs (m elements, n rows)."""
    staging = {"inputs": torch.empty((n, m), dtype=dtype, device=device)}
    if ta:
        staging["base"] = torch.empty(m, dtype=dtype, device=device)
    if sparsifier in RANDOM_SPARSIFIERS:
        staging["uniforms"] = torch.empty((n, m), dtype=torch.float64, device=device)
    if sparsifier is Sparsifier.DELLA_MAGPRUNE:
        staging["ranks"] = torch.empty((n, m), dtype=torch.int32, device=device)
    return staging


# --- the memory plan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a merger needs, by part and by place ("device" or "host"), before anything loads."""

    method: str
    placement: str
    device: str
    dtype: torch.dtype
    parameters: int  # merged floating-point parameters (N)
    rows: int  # inputs held per tensor (n): non-base sources, or every source for linear
    parts: Mapping[str, tuple[str, int]]  # part -> (place, bytes)

    def bytes_on(self, place: str) -> int:
        return sum(b for p, b in self.parts.values() if p == place)

    @property
    def device_bytes(self) -> int:
        return self.bytes_on("device")

    @property
    def host_bytes(self) -> int:
        return self.bytes_on("host")

    def describe(self) -> str:
        gb = 1e9
        lines = [f"{self.method}, {self.placement} on {self.device}, {self.dtype}: "
                 f"N = {self.parameters:,} parameters, n = {self.rows} rows per tensor"]
        for name, (place, size) in self.parts.items():
            lines.append(f"  {name:<10} {place:<6} {size / gb:9.3f} GB")
        lines.append(f"  device total {self.device_bytes / gb:.3f} GB, host total "
                     f"{self.host_bytes / gb:.3f} GB")
        return "\n".join(lines)


def memory_plan_from_shapes(shapes: Mapping[str, Sequence[int]], method: str, rows: int, *,
                            dtype: torch.dtype | str = torch.float32,
                            placement: Placement = "resident",
                            device: str | torch.device = "cpu",
                            chunk: int | None = None,
                            adapter_bytes: int | None = None) -> MemoryPlan:
    """The memory formula over the merged tensors' shapes (see docs/inplace.md).

    With s the dtype's bytes, N the parameters, n the rows per tensor and M the largest tensor:
    target N*s; base N*s (task-arithmetic family); inputs n*N*s (for the whole-tensor methods,
    slerp ... ramplus_tl and passthrough, n counts every source, the base included); magnitude
    orders (CUDA) or
    ranks (CPU) n*N*4 on the host (ties, breadcrumbs*); uniforms n*N*8 (dare*, della*); della
    ranks n*N*4; workspaces C*(n*(2s+2) + 4s + 10) for chunks of C = min(M, chunk) elements
    (whole tensors on CUDA), plus M*w*(n + 1) (w the work dtype's bytes) for the L1 rescale of
    dare*/della*. The whole-tensor methods run the method's own function on one whole tensor
    at a time; their temporaries (counted as "whole": M*4*(2n + 6), an estimate of the
    largest: float32 copies, stacked task vectors, norms) are allocated per tensor and freed.
    "stream" keeps the inputs on the host and adds device staging buffers for the largest
    tensor's inputs. `adapter_bytes` (LoRA adapters under task_arithmetic / linear, lowrank.py):
    target N*s, base N*s and the adapters' factors instead of any dense input.
    """
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    m = get_method(method)
    check_supported(m)
    dev = torch.device(device)
    s = element_size(torch_dtype)
    sizes = [math.prod(shape) for shape in shapes.values()]
    n_params, largest = sum(sizes), max(sizes, default=0)
    n = rows
    sparsifier = getattr(m, "sparsifier", None)
    index_bytes = element_size(index_dtype(largest))
    input_place = "device" if placement == "resident" else "host"

    parts: dict[str, tuple[str, int]] = {"target": ("device", n_params * s)}
    if adapter_bytes is not None:
        parts["base"] = ("device", n_params * s)
        parts["adapters"] = ("device", adapter_bytes)
        if dev.type == "cpu":
            parts = {k: ("host", b) for k, (_, b) in parts.items()}
        return MemoryPlan(method=method, placement=placement, device=str(dev), dtype=torch_dtype,
                          parameters=n_params, rows=n, parts=parts)
    per_element = n * s  # inputs
    if isinstance(m, TaskArithmeticMerge):
        parts["base"] = (input_place, n_params * s)
    parts["inputs"] = (input_place, n_params * n * s)
    if sparsifier in MAGNITUDE_SPARSIFIERS:
        parts["orders"] = ("host", n_params * n * index_bytes)
    if sparsifier in RANDOM_SPARSIFIERS:
        parts["uniforms"] = (input_place, n_params * n * 8)
        per_element += n * 8
    if sparsifier is Sparsifier.DELLA_MAGPRUNE:
        parts["ranks"] = (input_place, n_params * n * 4)
        per_element += n * 4
    c = largest if dev.type == "cuda" else min(largest, chunk or CPU_CHUNK)
    work = c * (n * (2 * s + 2) + 4 * s + 10)
    if sparsifier in RANDOM_SPARSIFIERS:
        work += largest * element_size(work_dtype(torch_dtype)) * (n + 1)
    parts["workspace"] = ("device", work)
    if is_whole(m):
        parts["whole"] = ("device", largest * 4 * (2 * n + 6))
    if placement == "stream":
        staging = largest * (per_element + (s if isinstance(m, TaskArithmeticMerge) else 0))
        parts["staging"] = ("device", staging)
    if dev.type == "cpu":  # one memory: report everything as host memory
        parts = {k: ("host", b) for k, (_, b) in parts.items()}
    return MemoryPlan(method=method, placement=placement, device=str(dev), dtype=torch_dtype,
                      parameters=n_params, rows=n, parts=parts)


# What the search prefers when the config leaves dtype and placement open: exact float32 deltas
# over bf16, and resident over streamed (a streamed tensor is copied to the device per candidate).
CHOICES: tuple[tuple[torch.dtype, Placement], ...] = (
    (torch.float32, "resident"), (torch.float32, "stream"),
    (torch.bfloat16, "resident"), (torch.bfloat16, "stream"))


def choose_plan(shapes: Mapping[str, Sequence[int]], method: str, rows: int, *,
                device_bytes: float, gpus: int = 1, host_bytes: float | None = None,
                dtype: torch.dtype | str | None = None, placement: Placement | None = None,
                adapter_bytes: int | None = None) -> MemoryPlan:
    """The first plan of CHOICES (only those of `dtype` / `placement` when given) whose device
    parts fit `device_bytes` per GPU, split over `gpus` (tensor-parallel: each GPU holds 1/gpus of
    every tensor, and its own workspace), and whose host parts fit `host_bytes` when given.
    ValueError naming the shortfall of the smallest candidate when none fits."""
    want = _dtype_name(dtype) if dtype is not None else None
    options = [(d, p) for d, p in CHOICES if (want is None or d == DTYPES[want])
               and (placement is None or p == placement)]
    if not options:  # a dtype outside CHOICES (float16, float64): that dtype, both placements
        options = [(DTYPES[want], p) for p in (placement,) if p] or [
            (DTYPES[want], p) for p in PLACEMENTS]
    tried = []
    for d, p in options:
        mp = memory_plan_from_shapes(shapes, method, rows, dtype=d, placement=p, device="cuda",
                                     adapter_bytes=adapter_bytes)
        per_gpu = per_gpu_bytes(mp, gpus)
        if per_gpu <= device_bytes and (host_bytes is None or mp.host_bytes <= host_bytes):
            return mp
        tried.append((per_gpu, mp))
    per_gpu, best = min(tried, key=lambda t: t[0])
    gb = 1e9
    short = [f"{per_gpu / gb:.1f} GB per GPU of {device_bytes / gb:.1f} GB"]
    if host_bytes is not None and best.host_bytes > host_bytes:
        short.append(f"{best.host_bytes / gb:.1f} GB of host memory of {host_bytes / gb:.1f} GB")
    raise ValueError(
        f"no memory plan fits {method} over {rows} inputs of {best.parameters / 1e9:.2f}B "
        f"parameters on {gpus} GPU(s): the smallest ({_dtype_name(best.dtype)}, {best.placement}) "
        "needs "
        f"{' and '.join(short)}, {(per_gpu - device_bytes) / gb:.1f} GB short per GPU; use "
        "more GPUs, LoRA sources (kept as factors), or fewer sources")


def per_gpu_bytes(mp: MemoryPlan, gpus: int) -> float:
    """Device bytes per GPU with every model-sized part split over `gpus` (workspaces and
    staging buffers, sized by one tensor or one chunk, are not split)."""
    whole = sum(b for name, (place, b) in mp.parts.items()
                if place == "device" and name in ("workspace", "whole", "staging"))
    return (mp.device_bytes - whole) / gpus + whole


def plan(models: Sequence[str], base_model: str | None, method: str, *,
         dtype: torch.dtype | str = torch.float32, placement: Placement = "resident",
         device: str | torch.device = "cpu", allow_pickle: bool = False) -> MemoryPlan:
    """Memory an `InPlaceMerger` needs, from config.json and the safetensors headers only."""
    recipe = probe_recipe(models, base_model, method, None, dtype)
    sources = {name: load_source(name, allow_pickle=allow_pickle, base=base_model)
               for name in recipe.referenced_models()}
    donor = next(iter(sources.values()))  # the base when there is one (listed first)
    order = recipe.output_slices(donor.layout.num_layers)[0].sources
    m = get_method(method)
    rows = len(order) - (1 if isinstance(m, TaskArithmeticMerge) else 0)
    shapes = {k: v for k, v in donor.shapes.items() if donor.dtypes[k].is_floating_point}
    from evomerge.merge.inplace import lowrank  # LoRA adapters kept as factors

    adapter_bytes = None
    if lowrank.applies(method, sources, base_model):
        torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        adapter_bytes = lowrank.resident_bytes(sources.values(), torch_dtype)
    return memory_plan_from_shapes(shapes, method, rows, dtype=dtype, placement=placement,
                                   device=device, adapter_bytes=adapter_bytes)


__all__ = ["CHOICES", "CPU_CHUNK", "choose_plan", "per_gpu_bytes", "MAGNITUDE_SPARSIFIERS", "PLACEMENTS", "RANDOM_SPARSIFIERS", "Entry",
           "MemoryPlan", "Placement", "Workspace", "check_supported", "element_size",
           "index_dtype", "is_whole", "make_staging", "make_workspace", "memory_plan_from_shapes", "plan",
           "probe_recipe", "work_dtype"]
