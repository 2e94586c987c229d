"""The in-place merger: many candidate recipes over the same sources, written into one model.

A search builds thousands of candidates from the same sources. `InPlaceMerger` reads and checks
the sources once (through the engine's `plan_merge`), keeps resident what every candidate needs,
and writes each candidate's merged tensors into one preallocated Hugging Face model:

- every method: per tensor, the inputs stacked as one [rows, numel] tensor: the task vectors
  x_i - B of the non-base sources (task-arithmetic family, with the base B), or the sources
  themselves (linear);
- magnitude sparsifiers (ties, breadcrumbs*): on CPU, each element's position (rank) in the
  stable argsort of its |delta|, so a density's cut is one integer comparison; on CUDA the
  argsort itself on the host, so a cut is two lookups and the mask one comparison of |delta|
  (ties in |delta| are split by the element index, exactly as the sort does);
- random sparsifiers (dare_*, della*): each source's mask uniforms (float64, generated once per
  mask seed); della also the per-row magnitude ranks, so keep probabilities are a table lookup.

The tensors are the engine's, bit for bit (`torch.equal` with `merge_state_dict` on the same
device and dtype): each candidate runs the engine's sequence of torch operations, only over
cache-sized chunks of the flattened tensors, with preallocated workspaces, so nothing grows from
candidate to candidate. Elementwise operations and the reductions over the source axis do not
depend on the chunking; the whole-tensor L1 norms of `rescale` are computed on full tensors as
the engine does.

On CPU in float32, the task-arithmetic family's per-tensor math also runs as one fused
whole-tensor kernel (`torch.compile`, inductor's C++ backend) that reads each input once: the
same operations in the same order, elementwise, so the same bits (inductor compiles without
floating-point contraction or reassociation). Each kernel variant is checked against the
chunked path the first time it runs; a compile failure (no C++ compiler) or any difference
switches the merger to the chunked path for good, with a warning. This module imports neither
lm-eval nor optimizers.
"""

from __future__ import annotations

import math
import os
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from evomerge.merge.engine import (
    DTYPES,
    MergePlan,
    TensorJob,
    _dtype_name,
    load_inputs,
    plan_jobs,
    plan_merge,
)
from evomerge.methods.registry import (
    Consensus,
    LinearMerge,
    TaskArithmeticMerge,
    get_method,
)
from evomerge.methods.sparsify import (
    RescaleMode,
    Sparsifier,
    check_della_density,
    della_ranks,
    uniforms,
)
from evomerge.models.sources import MergeError, load_source
from evomerge.recipes.parameter_space import Recipe, same_model

Placement = Literal["resident", "stream"]
PLACEMENTS = ("resident", "stream")
CPU_CHUNK = 1 << 17  # elements per chunk on CPU: a chunk's workspaces stay in the L2/L3 caches
# The compiled whole-tensor kernels (fused=None): on for models of at least FUSED_MIN_PARAMS
# merged parameters (below that, a candidate takes milliseconds and the compile, 5-40 s once per
# process, does not pay off); EVOMERGE_FUSED=1 or 0 turns them on or off for every size.
FUSED_ENV = "EVOMERGE_FUSED"
FUSED_MIN_PARAMS = 1 << 24
_MAGNITUDE_SPARSIFIERS = (Sparsifier.MAGNITUDE, Sparsifier.MAGNITUDE_OUTLIERS)
_RANDOM_SPARSIFIERS = (Sparsifier.RANDOM, Sparsifier.DELLA_MAGPRUNE)


# --- memory plan --------------------------------------------------------------------------------


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


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # The random sparsifiers mask float16 deltas in float32 (sparsify._work_dtype).
    return torch.float32 if dtype == torch.float16 else dtype


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def memory_plan_from_shapes(shapes: Mapping[str, Sequence[int]], method: str, rows: int, *,
                            dtype: torch.dtype | str = torch.float32,
                            placement: Placement = "resident",
                            device: str | torch.device = "cpu",
                            chunk: int | None = None) -> MemoryPlan:
    """The memory formula over the merged tensors' shapes (see docs/inplace.md).

    With s the dtype's bytes, N the parameters, n the rows per tensor and M the largest tensor:
    target N*s; base N*s (task-arithmetic family); inputs n*N*s; magnitude orders (CUDA) or
    ranks (CPU) n*N*4 on the host (ties, breadcrumbs*); uniforms n*N*8 (dare*, della*); della
    ranks n*N*4; workspaces C*(n*(2s+2) + 4s + 10) for chunks of C = min(M, chunk) elements
    (whole tensors on CUDA), plus M*w*(n + 1) (w the work dtype's bytes) for the L1 rescale of
    dare*/della*. "stream" keeps the inputs on the host and
    adds device staging buffers for the largest tensor's inputs.
    """
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    m = get_method(method)
    _check_supported(m)
    dev = torch.device(device)
    s = _element_size(torch_dtype)
    sizes = [math.prod(shape) for shape in shapes.values()]
    n_params, largest = sum(sizes), max(sizes, default=0)
    n = rows
    sparsifier = getattr(m, "sparsifier", None)
    index_bytes = _element_size(_index_dtype(largest))
    input_place = "device" if placement == "resident" else "host"

    parts: dict[str, tuple[str, int]] = {"target": ("device", n_params * s)}
    per_element = n * s  # inputs
    if isinstance(m, TaskArithmeticMerge):
        parts["base"] = (input_place, n_params * s)
    parts["inputs"] = (input_place, n_params * n * s)
    if sparsifier in _MAGNITUDE_SPARSIFIERS:
        parts["orders"] = ("host", n_params * n * index_bytes)
    if sparsifier in _RANDOM_SPARSIFIERS:
        parts["uniforms"] = (input_place, n_params * n * 8)
        per_element += n * 8
    if sparsifier is Sparsifier.DELLA_MAGPRUNE:
        parts["ranks"] = (input_place, n_params * n * 4)
        per_element += n * 4
    c = largest if dev.type == "cuda" else min(largest, chunk or CPU_CHUNK)
    work = c * (n * (2 * s + 2) + 4 * s + 10)
    if sparsifier in _RANDOM_SPARSIFIERS:
        work += largest * _element_size(_work_dtype(torch_dtype)) * (n + 1)
    parts["workspace"] = ("device", work)
    if placement == "stream":
        staging = largest * (per_element + (s if isinstance(m, TaskArithmeticMerge) else 0))
        parts["staging"] = ("device", staging)
    if dev.type == "cpu":  # one memory: report everything as host memory
        parts = {k: ("host", b) for k, (_, b) in parts.items()}
    return MemoryPlan(method=method, placement=placement, device=str(dev), dtype=torch_dtype,
                      parameters=n_params, rows=n, parts=parts)


def plan(models: Sequence[str], base_model: str | None, method: str, *,
         dtype: torch.dtype | str = torch.float32, placement: Placement = "resident",
         device: str | torch.device = "cpu", allow_pickle: bool = False) -> MemoryPlan:
    """Memory an `InPlaceMerger` needs, from config.json and the safetensors headers only."""
    recipe = _probe_recipe(models, base_model, method, None, dtype)
    sources = {name: load_source(name, allow_pickle=allow_pickle)
               for name in recipe.referenced_models()}
    donor = next(iter(sources.values()))  # the base when there is one (listed first)
    order = recipe.output_slices(donor.layout.num_layers)[0].sources
    m = get_method(method)
    rows = len(order) - (1 if isinstance(m, TaskArithmeticMerge) else 0)
    shapes = {k: v for k, v in donor.shapes.items() if donor.dtypes[k].is_floating_point}
    return memory_plan_from_shapes(shapes, method, rows, dtype=dtype, placement=placement,
                                   device=device)


# --- the merger ---------------------------------------------------------------------------------


def _check_supported(method: Any) -> None:
    if not isinstance(method, LinearMerge | TaskArithmeticMerge):
        raise ValueError(
            f"the in-place merger supports linear and the task-arithmetic family, not "
            f"{method.name!r}"
        )


def _probe_recipe(models: Sequence[str], base_model: str | None, method: str,
                  tokenizer_source: str | None, dtype: torch.dtype | str) -> Recipe:
    """A recipe over the merger's sources, used to index and check them (weights are dummies)."""
    if not models:
        raise ValueError("the in-place merger needs at least one model")
    _check_supported(get_method(method))
    return Recipe.from_dict({
        "merge_method": method,
        "base_model": base_model,
        "models": [{"model": str(m)} for m in models],
        "parameters": {"weight": 1.0},
        "tokenizer_source": tokenizer_source,
        "dtype": _dtype_name(dtype),
    }, "<in-place merger>")


@dataclass
class _Entry:
    """What one output tensor needs, resident; `inputs` rows are in the slices' source order."""

    name: str
    shape: torch.Size
    numel: int
    cols: int  # della: the length of a row along dim 1
    target: torch.Tensor  # flat view of the model's parameter
    inputs: torch.Tensor  # [n, N]: task vectors, or linear's sources
    keys: tuple[int, ...]  # group key (slice source index) of each input row
    base: torch.Tensor | None = None  # [N] (task-arithmetic family)
    orders: torch.Tensor | None = None  # host [n, N] (CUDA): stable argsort of |delta|
    mag_ranks: torch.Tensor | None = None  # [n, N] (CPU): each element's position in it
    ranks: torch.Tensor | None = None  # [n, N] int32: della ranks of |delta| along dim 1
    uniforms: torch.Tensor | None = None  # [n, N] float64 for the merger's mask seed
    l1: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> |delta|.abs().sum()


@dataclass
class _Workspace:
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


class InPlaceMerger:
    """Builds candidate recipes over fixed sources into one preallocated model, in place.

    `models`, `base_model` and `method` fix the sources (as a recipe's `models:` list, its
    `base_model` and `merge_method`); `build(recipe)` accepts any recipe over them with the same
    layer structure (slices whose sources are these models, in this order, each output layer
    taken from the same layer of every source) and any parameters, gradients, filters and mask
    seed.

    placement "resident": everything on `device`. "stream": the resident inputs stay in CPU
    memory (pinned when CUDA is available) and are copied to `device` tensor by tensor; only the
    target model and one tensor's staging and workspace buffers live on `device`.

    `fused`: on CPU in float32 with resident placement, build the task-arithmetic family's
    tensors with compiled whole-tensor kernels (checked against the chunked path on first use;
    any failure falls back to it). None (default): on for models of at least FUSED_MIN_PARAMS
    merged parameters, or as the environment's EVOMERGE_FUSED=1/0 says.
    """

    model: torch.nn.Module

    def __init__(self, models: Sequence[str], base_model: str | None, method: str, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                 placement: Placement = "resident", allow_pickle: bool = False,
                 tokenizer_source: str | None = None, chunk: int | None = None,
                 fused: bool | None = None) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        self.device = torch.device(device)
        self.dtype: torch.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.dtype_name = _dtype_name(self.dtype)
        self.placement = placement
        self.method_name = method
        self.base_model = base_model
        self.tokenizer_source = tokenizer_source
        self.method = get_method(method)
        probe = _probe_recipe(models, base_model, method, tokenizer_source, self.dtype)
        self._plan: MergePlan = plan_merge(probe, allow_pickle=allow_pickle)  # every check
        self.num_layers = self._plan.donor.layout.num_layers
        self.source_order = tuple(
            s.model for s in probe.output_slices(self.num_layers)[0].sources)
        self._ta = isinstance(self.method, TaskArithmeticMerge)
        self._sparsifier: Sparsifier | None = getattr(self.method, "sparsifier", None)
        cuda = self.device.type == "cuda"
        self._host = torch.device("cpu") if placement == "stream" else self.device
        self._pin = placement == "stream" and torch.cuda.is_available()
        self._mask_seed: int | None = None

        self.model = self._make_model()
        targets = self.model.state_dict(keep_vars=True)
        self._entries: dict[str, _Entry] = {}
        covered: set[int] = set()
        with ExitStack() as stack, torch.no_grad():
            for job in self._plan.jobs:
                param = targets.get(job.name)
                if param is None:
                    raise MergeError(f"{job.name}: the target model has no such tensor")
                tensors = load_inputs(self._plan, job, stack, device=self._host,
                                      dtype=self.dtype)
                covered.add(param.data_ptr())
                entry = self._make_entry(job, tensors, param.detach())
                if entry is not None:
                    self._entries[job.name] = entry
        uncovered = [k for k, p in self.model.named_parameters() if p.data_ptr() not in covered]
        if uncovered:
            raise MergeError(f"the target model has parameters that no source provides: "
                             f"{uncovered[:5]}")
        largest = max((e.numel for e in self._entries.values()), default=1)
        rows = max((e.inputs.shape[0] for e in self._entries.values()), default=1)
        self._chunk = largest if cuda else min(largest, chunk or CPU_CHUNK)
        self._largest = largest
        self._ws = self._workspace(rows, self._chunk)
        self._sequential_sum = not cuda and _sequential_sum_is_exact(rows, self.dtype)
        # The fused kernels add the rows one by one, which equals the engine's sum(dim=0) only
        # where that was checked (or for one row); float32 only (inductor computes bfloat16 and
        # float16 in float32 without rounding between operations).
        if fused is None:
            env = os.environ.get(FUSED_ENV, "")
            n_params = sum(e.numel for e in self._entries.values())
            fused = env == "1" or (env != "0" and n_params >= FUSED_MIN_PARAMS)
        self._fused = fused and self.device.type == "cpu" and placement == "resident" \
            and self.dtype == torch.float32 and self._ta \
            and self._sparsifier is not Sparsifier.MAGNITUDE_OUTLIERS \
            and (rows == 1 or self._sequential_sum)
        self._fused_checked: set[tuple] = set()  # kernel variants already checked here
        self._staging: dict[str, torch.Tensor] = {}
        if placement == "stream":
            self._staging = self._make_staging(rows, largest)

    # --- setup -----------------------------------------------------------------------------

    def _make_model(self) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = dict(self._plan.out_config)
        model_type = config.pop("model_type")
        config.pop("dtype", None)
        config.pop("torch_dtype", None)
        cfg = AutoConfig.for_model(model_type, **config)
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=self.dtype)
        model.eval()
        model.requires_grad_(False)
        return model

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        return t.pin_memory() if self._pin else t

    def _make_entry(self, job: TensorJob, tensors: dict[int, torch.Tensor],
                    target: torch.Tensor) -> _Entry | None:
        first = tensors[0]
        if tuple(target.shape) != tuple(first.shape):
            raise MergeError(f"{job.name}: the target model's shape {list(target.shape)} differs "
                             f"from the sources' {list(first.shape)}")
        flat_target = target.view(-1)
        ta = self._ta
        keys = tuple(k for k in tensors if not (ta and k == job.base))
        if not first.is_floating_point() or not keys:
            # Integer buffers, or a slice with the base alone: the same for every candidate.
            fixed = tensors[job.base] if job.base is not None else first
            flat_target.copy_(fixed.reshape(-1))
            return None
        numel = first.numel()
        base = None
        if ta:
            b = tensors[job.base]
            base = self._place(b.reshape(-1))
            rows = torch.empty((len(keys), numel), dtype=self.dtype, device=self._host)
            for row, k in enumerate(keys):
                rows[row] = (tensors[k] - b).reshape(-1)  # the engine's delta, in its dtype
        else:
            rows = torch.stack([tensors[k].reshape(-1) for k in keys])
        entry = _Entry(name=job.name, shape=first.shape, numel=numel,
                       cols=first.shape[1] if first.dim() >= 2 else numel,
                       target=flat_target, inputs=self._place(rows), keys=keys, base=base)
        if self._sparsifier in _MAGNITUDE_SPARSIFIERS:
            # ties keeps the first k of the stable descending order, breadcrumbs a range of the
            # ascending one. CPU: store each element's rank in that order (the mask is then a
            # comparison of ranks); CUDA: the order on the host (two lookups per cut).
            descending = self._sparsifier is Sparsifier.MAGNITUDE
            index = _index_dtype(numel)
            ranks_here = self.device.type == "cpu"
            orders = torch.empty((len(keys), numel), dtype=index)
            for row in range(len(keys)):
                key = _sort_key(entry.inputs[row])
                order = torch.argsort(key, descending=descending, stable=True).cpu()
                if ranks_here:  # the inverse permutation: rank[order[j]] = j
                    orders[row, order] = torch.arange(numel, dtype=index)
                else:
                    orders[row] = order
            if ranks_here:
                entry.mag_ranks = orders
            else:
                entry.orders = orders
        if self._sparsifier is Sparsifier.DELLA_MAGPRUNE:
            ranks = torch.empty((len(keys), numel), dtype=torch.int32, device=self._host)
            for row in range(len(keys)):
                ranks[row] = della_ranks(entry.inputs[row].view(first.shape)).reshape(-1)
            entry.ranks = self._place(ranks)
        return entry

    def _workspace(self, n: int, c: int) -> _Workspace:
        dev, dt = self.device, self.dtype
        acc = torch.float64 if dt == torch.float64 else torch.float32

        def empty(*shape: int, dtype: torch.dtype = dt) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, device=dev)

        # Masks are float 1.0 / 0.0 like the engine's `.to(dtype)` masks: comparisons that
        # write floats and float multiplications vectorize, bool tensors do not.
        return _Workspace(
            w=empty(n, c), prod=empty(n, c), sgn=empty(n, c), agree=empty(n, c), a=empty(c),
            mask=empty(c), mask_work=empty(c, dtype=_work_dtype(dt)),
            work=empty(c, dtype=_work_dtype(dt)), sums=empty(c), maj=empty(c), div=empty(c),
            tmp=empty(c), acc=empty(c, dtype=acc), probs=empty(c, dtype=torch.float64),
        )

    def _make_staging(self, n: int, m: int) -> dict[str, torch.Tensor]:
        dev = self.device
        staging = {"inputs": torch.empty((n, m), dtype=self.dtype, device=dev)}
        if self._ta:
            staging["base"] = torch.empty(m, dtype=self.dtype, device=dev)
        if self._sparsifier in _RANDOM_SPARSIFIERS:
            staging["uniforms"] = torch.empty((n, m), dtype=torch.float64, device=dev)
        if self._sparsifier is Sparsifier.DELLA_MAGPRUNE:
            staging["ranks"] = torch.empty((n, m), dtype=torch.int32, device=dev)
        return staging

    def _ensure_uniforms(self, mask_seed: int) -> None:
        """Mask uniforms for `mask_seed`, (re)generated in place when the seed changes."""
        if self._mask_seed == mask_seed:
            return
        for e in self._entries.values():
            if e.uniforms is None:
                e.uniforms = self._place(torch.empty((len(e.keys), e.numel),
                                                     dtype=torch.float64, device=self._host))
            for row, key in enumerate(e.keys):
                e.uniforms[row] = uniforms(mask_seed, f"{key}:{e.name}", (e.numel,),
                                           e.uniforms.device)
        self._mask_seed = mask_seed

    # --- recipes ---------------------------------------------------------------------------

    def check(self, recipe: Recipe) -> list[TensorJob]:
        """Resolve `recipe`'s per-tensor parameters; ValueError if it is not over these sources."""
        if recipe.merge_method != self.method_name:
            raise ValueError(f"the recipe's merge_method {recipe.merge_method!r} differs from "
                             f"the merger's {self.method_name!r}")
        if (recipe.base_model is None) != (self.base_model is None) or (
                self.base_model is not None and not same_model(recipe.base_model,
                                                               self.base_model)):
            raise ValueError(f"the recipe's base_model {recipe.base_model!r} differs from the "
                             f"merger's {self.base_model!r}")
        for what, value in (("dtype", recipe.dtype), ("out_dtype", recipe.out_dtype)):
            if value is not None and value != self.dtype_name:
                raise ValueError(f"the recipe's {what} {value!r} differs from the merger's dtype "
                                 f"{self.dtype_name!r}")
        ts, mine = recipe.tokenizer_source, self.tokenizer_source
        if (ts is None) != (mine is None) or (ts is not None and ts != mine
                                              and not same_model(ts, mine)):
            raise ValueError(f"the recipe's tokenizer_source {ts!r} differs from the merger's "
                             f"{mine!r}")
        start = 0
        for i, s in enumerate(recipe.output_slices(self.num_layers)):
            names = [src.model for src in s.sources]
            if len(names) != len(self.source_order) or not all(
                    same_model(a, b) for a, b in zip(names, self.source_order, strict=False)):
                raise ValueError(f"slices.{i}: the sources {names} differ from the merger's "
                                 f"{list(self.source_order)} (the same models in the same order)")
            for src in s.sources:
                if tuple(src.layer_range) != (start, start + s.num_layers):
                    raise ValueError(
                        f"slices.{i}: layer_range {list(src.layer_range)} of {src.model} differs "
                        f"from the merger's layer structure (output layers {start}.."
                        f"{start + s.num_layers - 1} taken from the same layers of every source)")
            start += s.num_layers
        if start != self.num_layers:
            raise ValueError(f"the recipe's slices give {start} layers; the merger was built for "
                             f"{self.num_layers}")
        return plan_jobs(recipe, self._plan)

    def build(self, recipe: Recipe) -> torch.nn.Module:
        """Writes the recipe's merged tensors into self.model in place and returns it."""
        jobs = self.check(recipe)
        if self._sparsifier in _RANDOM_SPARSIFIERS:
            self._ensure_uniforms(recipe.mask_seed)
        with torch.no_grad():
            for job in jobs:
                entry = self._entries.get(job.name)
                if entry is None:
                    continue
                try:
                    if self._ta:
                        self._task_arithmetic(entry, job)
                    else:
                        self._linear(entry, job)
                except ValueError as err:
                    raise MergeError(f"{job.name}: {err}") from None
        return self.model

    # --- the merge math, chunk by chunk --------------------------------------------------------

    def _chunks(self, numel: int) -> range:
        return range(0, numel, self._chunk)

    def _sum_rows(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """torch.sum(x, dim=0, out=out); on CPU as row additions when those give the same bits
        (checked at construction): they are cheaper than the strided reduction."""
        if not self._sequential_sum or x.shape[0] < 2:
            torch.sum(x, dim=0, out=out)
            return
        torch.add(x[0], x[1], out=out)
        for row in range(2, x.shape[0]):
            out.add_(x[row])

    def _stage(self, e: _Entry) -> tuple[torch.Tensor, torch.Tensor | None,
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
            buf = self._staging[key]
            view = buf[:n, :numel] if src.dim() == 2 else buf[:numel]
            view.copy_(src, non_blocking=True)
            out.append(view)
        return out[0], out[1], out[2], out[3]  # type: ignore[return-value]

    def _linear(self, e: _Entry, job: TensorJob) -> None:
        # LinearMerge.merge: float32 (float64) accumulation with addcmul_, then / sum(w).
        inputs, _, _, _ = self._stage(e)
        acc_dtype = self._ws.acc.dtype
        weights = torch.tensor([job.per_source[k]["weight"] for k in e.keys], dtype=acc_dtype)
        ws = [w.to(self.device) for w in weights.unbind(0)]
        denominator = None
        if job.shared["normalize"]:
            denominator = weights.sum()
            if denominator == 0:
                raise ValueError(f"linear: the weights sum to 0 for {e.name} (normalize: true)")
            denominator = denominator.to(self.device)
        in_target = e.target.dtype == acc_dtype
        for lo in self._chunks(e.numel):
            hi = min(lo + self._chunk, e.numel)
            acc = e.target[lo:hi] if in_target else self._ws.acc[: hi - lo]
            acc.zero_()
            for row, w in enumerate(ws):
                acc.addcmul_(inputs[row, lo:hi], w)
            if denominator is not None:
                acc.div_(denominator)
            if not in_target:
                e.target[lo:hi].copy_(acc)

    def _task_arithmetic(self, e: _Entry, job: TensorJob) -> None:
        if self._fused:
            inputs = self._fused_inputs(e, job)  # raises the chunked path's ValueErrors
            if inputs is not None and self._fused_run(e, job, inputs):
                return
        self._task_arithmetic_chunked(e, job)

    # --- the fused whole-tensor kernels (CPU, float32) ----------------------------------------

    def _fused_inputs(self, e: _Entry, job: TensorJob) -> _FusedInputs | None:
        """Per-row mask inputs for the fused kernels, or None where the chunked path must run
        (zeroed rows, inverse-density rescale, empty tensors)."""
        sp = self._sparsifier
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
                    table = self._della_table(e.cols, density, params["epsilon"])
                aa[row], bb[row], tt[row] = e.uniforms[row], e.ranks[row], table
        l1 = sp is not None and rescale is RescaleMode.L1
        return _FusedInputs(kind, aa, bb, tt, full, l1)

    def _fused_run(self, e: _Entry, job: TensorJob, f: _FusedInputs) -> bool:
        """Runs the fused kernels into e.target; False (and the merger falls back to the chunked
        path for good) if they cannot be compiled here. A kernel variant's first run is checked
        against the chunked path, which then writes the target either way."""
        method: TaskArithmeticMerge = self.method  # type: ignore[assignment]
        consensus = method.consensus is Consensus.SUM
        key = (f.kind, f.l1, consensus, len(e.keys))
        try:
            self._fused_kernels(e, job, f, consensus)
        except Exception as err:  # noqa: BLE001 - no compiler, an inductor limitation, ...
            self._fused = False
            warnings.warn(f"in-place merger: the fused kernels failed ({type(err).__name__}: "
                          f"{str(err)[:200]}); using the chunked path", stacklevel=4)
            return False
        if key in self._fused_checked:
            return True
        fused = e.target.clone()
        self._task_arithmetic_chunked(e, job)
        if torch.equal(fused, e.target):
            self._fused_checked.add(key)
        else:
            self._fused = False
            warnings.warn(f"in-place merger: the fused kernel {key} differs from the chunked "
                          f"path on {e.name}; using the chunked path", stacklevel=4)
        return True

    def _fused_kernels(self, e: _Entry, job: TensorJob, f: _FusedInputs,
                       consensus: bool) -> None:
        n = len(e.keys)
        shared = job.shared
        dt = self.dtype
        deltas: list[torch.Tensor] = list(e.inputs.unbind(0))
        kind, tt = f.kind, list(f.tt)
        aa, bb = list(f.aa), list(f.bb)
        if f.l1:
            # pass 1: |masked delta| of the whole tensor, for the engine's L1 sum; pass 2
            # rebuilds the masked delta as copysign(|masked|, delta) (the same bits)
            if dt not in self._ws.full:
                self._ws.full[dt] = (torch.empty(self._largest, dtype=dt, device=self.device),
                                     torch.empty((n, self._largest), dtype=dt,
                                                 device=self.device))
            one = torch.ones((), dtype=dt)
            absolutes = list(self._ws.full[dt][1][:, : e.numel].unbind(0))
            _kernel("mask", _mask_kernel, (kind, n))(absolutes, kind, deltas, aa, bb, tt)
            for row in range(n):
                absolute = absolutes[row]
                ratio = one
                if not f.full[row]:  # sparsify._apply_mask's L1 matching and guard
                    after = absolute.view(e.shape).sum()
                    before = self._l1_before(e, row, deltas[row], False)
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

    def _task_arithmetic_chunked(self, e: _Entry, job: TensorJob) -> None:
        method: TaskArithmeticMerge = self.method  # type: ignore[assignment]
        inputs, base, uniforms_, ranks = self._stage(e)
        assert base is not None
        n = len(e.keys)
        shared = job.shared
        rescale = RescaleMode(shared["rescale_mode"]) if shared["rescale"] else None
        rows = [self._row_plan(e, row, job.per_source[k], rescale, inputs, uniforms_, ranks)
                for row, k in enumerate(e.keys)]
        if rescale is RescaleMode.L1 and any(r.needs_l1 for r in rows):
            self._l1_pass(e, rows)
        weights = torch.tensor([job.per_source[k]["weight"] for k in e.keys], dtype=self.dtype,
                               device=self.device).reshape(n, 1)
        consensus = method.consensus is Consensus.SUM
        divisor = None
        if not consensus:
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        normalize, lam = shared["normalize"], shared["lambda"]
        ws = self._ws
        for lo in self._chunks(e.numel):
            hi = min(lo + self._chunk, e.numel)
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
                self._sum_rows(w, mixed)
                maj = ws.maj[:c]
                torch.ge(mixed, 0, out=maj)
                maj.mul_(2).sub_(1)  # (sum >= 0).to(dtype) * 2 - 1
                sgn, agree, prod = ws.sgn[:n, :c], ws.agree[:n, :c], ws.prod[:n, :c]
                torch.sign(w, out=sgn)
                torch.eq(sgn, maj, out=agree)  # pruned zeros have sign 0: never counted
                torch.mul(w, agree, out=prod)
                self._sum_rows(prod, mixed)
                div = ws.div[:c]
                torch.mul(weights, agree, out=prod)
                self._sum_rows(prod, div)
                zero = ws.tmp[:c]
                torch.eq(div, 0, out=zero)
                div.add_(zero)  # divisor[divisor == 0] = 1, exactly: 0 + 1 and x + 0
            else:
                self._sum_rows(w, mixed)
                div = divisor
            if normalize:
                mixed.div_(div)
            if lam != 1:
                mixed.mul_(lam)
            torch.add(base[lo:hi], mixed, out=e.target[lo:hi])

    # --- sparsification ----------------------------------------------------------------------

    def _row_plan(self, e: _Entry, row: int, params: Mapping[str, Any],
                  rescale: RescaleMode | None, inputs: torch.Tensor,
                  uniforms_: torch.Tensor | None, ranks: torch.Tensor | None) -> _Row:
        """How one source's delta is sparsified for this candidate (sparsify.sparsify's cases)."""
        sp = self._sparsifier
        density = params.get("density", 1.0)
        delta = inputs[row]
        if sp is None or density >= 1:
            return _Row(self, delta, "dense")
        if sp is Sparsifier.MAGNITUDE_OUTLIERS:
            mask_fn = self._outlier_mask(e, row, density, params["gamma"])
        elif density <= 0 or e.numel == 0:
            return _Row(self, delta, "zero")
        elif sp is Sparsifier.MAGNITUDE:
            mask_fn = self._topk_mask(e, row, density)
        elif sp is Sparsifier.RANDOM:
            assert uniforms_ is not None
            u = uniforms_[row]

            def mask_fn(out: torch.Tensor, lo: int, hi: int) -> None:
                torch.lt(u[lo:hi], density, out=out)
        else:
            check_della_density(density, params["epsilon"])
            assert uniforms_ is not None and ranks is not None
            mask_fn = self._della_mask(e, uniforms_[row], ranks[row], density, params["epsilon"])
        # magnitude sparsifiers mask in the delta's dtype; random ones in the work dtype
        work = sp in _RANDOM_SPARSIFIERS and _work_dtype(self.dtype) != self.dtype
        return _Row(self, delta, "mask", mask_fn=mask_fn, density=density, rescale=rescale,
                    work=work, before=self._l1_before(e, row, delta, work)
                    if rescale is RescaleMode.L1 else None)

    def _l1_before(self, e: _Entry, row: int, delta: torch.Tensor, work: bool) -> torch.Tensor:
        """|delta|.sum() over the whole tensor, as _apply_mask computes it; cached per source."""
        if row not in e.l1:
            t = delta.view(e.shape)
            e.l1[row] = (t.float() if work else t).abs().sum()
        return e.l1[row]

    def _topk_mask(self, e: _Entry, row: int, density: float) -> _MaskFn:
        k = max(1, int(density * e.numel))
        if e.mag_ranks is not None:  # CPU: the first k of the stable descending order
            return self._rank_mask(e.mag_ranks[row], 0, k)
        # Stable descending order keeps the first k of (-|x|, index): |x| > thr, plus the
        # elements equal to thr up to the index of the k-th kept element.
        assert e.orders is not None
        cut = int(e.orders[row, k - 1])
        thr = _abs_at(e.inputs[row], cut)
        delta = self._stage_row(e, row)

        def mask_fn(out: torch.Tensor, lo: int, hi: int) -> None:
            a = self._ws.a[: hi - lo]
            torch.abs(delta[lo:hi], out=a)
            _split_compare(a, out, cut + 1 - lo, torch.ge, torch.gt, thr)
        return mask_fn

    def _outlier_mask(self, e: _Entry, row: int, density: float, gamma: float) -> _MaskFn:
        # magnitude_outliers keeps ascending stable ranks [n_bot, n_bot + target): bounded below
        # and above by (|x|, index) of two elements of the order.
        n = e.numel
        target = max(0, int(density * n))
        n_top = int(gamma * n)
        n_bot = max(0, n - target - n_top)
        start, stop = min(n_bot, n), min(n_bot + target, n)
        if e.mag_ranks is not None:  # CPU: ranks start..stop-1 of the stable ascending order
            return self._rank_mask(e.mag_ranks[row], start, stop)
        assert e.orders is not None
        delta = self._stage_row(e, row)
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
            a = self._ws.a[: hi - lo]
            torch.abs(delta[lo:hi], out=a)
            if lower is None:
                out.fill_(1)
            else:
                _split_compare(a, out, lower[0] - lo, torch.gt, torch.ge, lower[1])
            if upper is not None:
                tmp = self._ws.tmp[: hi - lo]
                _split_compare(a, tmp, upper[0] + 1 - lo, torch.le, torch.lt, upper[1])
                out.mul_(tmp)
        return mask_fn

    def _rank_mask(self, ranks: torch.Tensor, start: int, stop: int) -> _MaskFn:
        """mask = start <= rank < stop, as 1.0 / 0.0 (the elements that `mask[order[start:stop]]
        = 1` sets, since rank is the inverse permutation of order)."""

        def mask_fn(out: torch.Tensor, lo: int, hi: int) -> None:
            if stop <= start:
                out.zero_()
                return
            torch.lt(ranks[lo:hi], stop, out=out)
            if start > 0:
                tmp = self._ws.tmp[: hi - lo]
                torch.ge(ranks[lo:hi], start, out=tmp)
                out.mul_(tmp)
        return mask_fn

    def _della_mask(self, e: _Entry, u: torch.Tensor, ranks: torch.Tensor, density: float,
                    epsilon: float) -> _MaskFn:
        # della_probabilities over the `cols` possible ranks, then one gather per element: the
        # same float64 operations on the same values as the engine's whole-tensor computation.
        table = self._della_table(e.cols, density, epsilon)

        def mask_fn(out: torch.Tensor, lo: int, hi: int) -> None:
            p = self._ws.probs[: hi - lo]
            torch.index_select(table, 0, ranks[lo:hi], out=p)
            torch.lt(u[lo:hi], p, out=out)
        return mask_fn

    def _della_table(self, cols: int, density: float, epsilon: float) -> torch.Tensor:
        """della_probabilities for the ranks 0..cols-1, with the engine's float64 operations."""
        r = torch.arange(cols, dtype=torch.float64, device=self.device)
        rank_norm = r / (cols - 1) if cols > 1 else torch.full_like(r, 0.5)
        return (density - epsilon) + rank_norm * (2 * epsilon)

    def _stage_row(self, e: _Entry, row: int) -> torch.Tensor:
        if self.placement == "resident":
            return e.inputs[row]
        return self._staging["inputs"][row, : e.numel]

    def _l1_pass(self, e: _Entry, rows: list[_Row]) -> None:
        """`masked.abs().sum()` needs the whole masked tensor: write it once, then sum it."""
        ws = self._ws
        for row, r in enumerate(rows):
            if not r.needs_l1:
                continue
            # the random sparsifiers norm float16 in float32, the magnitude ones in the dtype
            dtype = _work_dtype(self.dtype) if r.work else self.dtype
            if dtype not in ws.full:
                ws.full[dtype] = (
                    torch.empty(self._largest, dtype=dtype, device=self.device),
                    torch.empty((len(e.keys), self._largest), dtype=dtype, device=self.device))
            full = ws.full[dtype][0][: e.numel]
            kept = ws.full[dtype][1][row, : e.numel]
            for lo in self._chunks(e.numel):
                hi = min(lo + self._chunk, e.numel)
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


_MaskFn = Callable[[torch.Tensor, int, int], None]


@dataclass
class _FusedInputs:
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
        keep = a < t  # rank < k (ties: the first k of the stable order), or U < density
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


class _Row:
    """One source's sparsified delta for one candidate, filled chunk by chunk."""

    def __init__(self, merger: InPlaceMerger, delta: torch.Tensor, kind: str, *,
                 mask_fn: _MaskFn | None = None, density: float = 1.0,
                 rescale: RescaleMode | None = None, work: bool = False,
                 before: torch.Tensor | None = None) -> None:
        self.merger = merger
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
        buf = self.merger._ws.work[: hi - lo]
        buf.copy_(self.delta[lo:hi])
        return buf

    def masked(self, lo: int, hi: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """delta[lo:hi] * mask in the work dtype, as _apply_mask starts (into `out` if the
        work dtype is the dtype, else into a workspace view)."""
        assert self.mask_fn is not None
        ws = self.merger._ws
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


def _sequential_sum_is_exact(rows: int, dtype: torch.dtype) -> bool:
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


__all__ = ["InPlaceMerger", "MemoryPlan", "memory_plan_from_shapes", "plan"]
