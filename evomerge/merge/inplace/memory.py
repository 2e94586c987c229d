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
                adapter_bytes: int | None = None, device: str = "cuda") -> MemoryPlan:
    """The first plan of CHOICES (only those of `dtype` / `placement` when given) whose device
    parts fit `device_bytes` per GPU, split over `gpus` (tensor-parallel: each GPU holds 1/gpus of
    every tensor, and its own workspace), and whose host parts fit `host_bytes` when given.
    `device` "cpu": one memory, `device_bytes` of it; only "resident" (streaming from the host to
    the host saves nothing). ValueError naming the shortfall of the smallest candidate when none
    fits."""
    cpu = torch.device(device).type == "cpu"
    want = _dtype_name(dtype) if dtype is not None else None
    options = [(d, p) for d, p in CHOICES if (want is None or d == DTYPES[want])
               and (placement is None or p == placement) and (not cpu or p == "resident")]
    if not options:  # a dtype outside CHOICES (float16, float64), or stream asked for on CPU
        options = [(DTYPES[want], p) if want else (torch.float32, p)
                   for p in ((placement,) if placement else ("resident",) if cpu else PLACEMENTS)]
    tried = []
    for d, p in options:
        mp = memory_plan_from_shapes(shapes, method, rows, dtype=d, placement=p,
                                     device="cpu" if cpu else "cuda", adapter_bytes=adapter_bytes)
        need = mp.host_bytes if cpu else per_gpu_bytes(mp, gpus)
        if need <= device_bytes and (cpu or host_bytes is None or mp.host_bytes <= host_bytes):
            return mp
        tried.append((need, mp))
    need, best = min(tried, key=lambda t: t[0])
    gb = 1e9
    where = "of host memory" if cpu else "per GPU"
    short = [f"{need / gb:.1f} GB {where} of {device_bytes / gb:.1f} GB"]
    if not cpu and host_bytes is not None and best.host_bytes > host_bytes:
        short.append(f"{best.host_bytes / gb:.1f} GB of host memory of {host_bytes / gb:.1f} GB")
    fixes = ("a bfloat16 dtype, a GPU, or fewer sources" if cpu
             else "more GPUs, LoRA sources (kept as factors), or fewer sources")
    raise ValueError(
        f"no memory plan fits {method} over {rows} inputs of {best.parameters / 1e9:.2f}B "
        f"parameters on {'the CPU' if cpu else f'{gpus} GPU(s)'}: the smallest "
        f"({_dtype_name(best.dtype)}, {best.placement}) needs {' and '.join(short)}, "
        f"{(need - device_bytes) / gb:.1f} GB short {'' if cpu else 'per GPU'}".rstrip()
        + f"; use {fixes}")


def per_gpu_bytes(mp: MemoryPlan, gpus: int) -> float:
    """Device bytes per GPU with every model-sized part split over `gpus` (workspaces and
    staging buffers, sized by one tensor or one chunk, are not split)."""
    whole = sum(b for name, (place, b) in mp.parts.items()
                if place == "device" and name in ("workspace", "whole", "staging"))
    return (mp.device_bytes - whole) / gpus + whole


def _plan_inputs(models: Sequence[str], base_model: str | None, method: str,
                 dtype: torch.dtype | str, allow_pickle: bool
                 ) -> tuple[dict[str, Sequence[int]], int, int | None]:
    """(shapes of the merged floating-point tensors, rows per tensor, adapter bytes or None)
    from config.json and the safetensors headers only."""
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
    return shapes, rows, adapter_bytes


def plan(models: Sequence[str], base_model: str | None, method: str, *,
         dtype: torch.dtype | str = torch.float32, placement: Placement = "resident",
         device: str | torch.device = "cpu", allow_pickle: bool = False) -> MemoryPlan:
    """Memory an `InPlaceMerger` needs, from config.json and the safetensors headers only."""
    shapes, rows, adapter_bytes = _plan_inputs(models, base_model, method, dtype, allow_pickle)
    return memory_plan_from_shapes(shapes, method, rows, dtype=dtype, placement=placement,
                                   device=device, adapter_bytes=adapter_bytes)


# Of a GPU's memory, what the plan leaves to the evaluator beside the merged model (activations,
# vLLM's KV cache): the plan table (scripts/bench_lora_memory.py) keeps 8 GB of an 80 GB GPU.
EVALUATOR_SHARE = 0.1


def memory_capacity(device: str | torch.device) -> float:
    """Bytes a merger may plan for on `device`: a GPU's memory less EVALUATOR_SHARE of it; on CPU
    the host memory available now (MemAvailable: RAM not held by other processes)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev.index or 0).total_memory
        return total * (1 - EVALUATOR_SHARE)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def auto_plan(models: Sequence[str], base_model: str | None, method: str, *,
              device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
              placement: Placement | None = None, allow_pickle: bool = False,
              capacity: float | None = None) -> MemoryPlan:
    """The plan `choose_plan` picks for these sources on `device` (one GPU, or the CPU) when
    `dtype` or `placement` is left open (None), within `capacity` bytes (default:
    `memory_capacity(device)`); ValueError naming the shortfall when none fits. LoRA adapters
    are counted at float32 (an upper bound for the bf16 choices)."""
    shapes, rows, adapter_bytes = _plan_inputs(models, base_model, method,
                                               dtype or torch.float32, allow_pickle)
    dev = torch.device(device)
    room = memory_capacity(dev) if capacity is None else capacity
    return choose_plan(shapes, method, rows, device_bytes=room, dtype=dtype, placement=placement,
                       adapter_bytes=adapter_bytes, device=dev.type)


__all__ = ["CHOICES", "CPU_CHUNK", "EVALUATOR_SHARE", "auto_plan", "choose_plan", "memory_capacity", "per_gpu_bytes", "MAGNITUDE_SPARSIFIERS", "PLACEMENTS", "RANDOM_SPARSIFIERS", "Entry",
           "MemoryPlan", "Placement", "Workspace", "check_supported", "element_size",
           "index_dtype", "is_whole", "make_staging", "make_workspace", "memory_plan_from_shapes", "plan",
           "probe_recipe", "work_dtype"]
