"""The in-place merger: many candidate recipes over the same sources, written into one model.

A search builds thousands of candidates from the same sources. `InPlaceMerger` reads and checks
the sources once (through the engine's `plan_merge`), keeps resident what every candidate needs,
and writes each candidate's merged tensors into one preallocated Hugging Face model:

- every method: per tensor, the inputs stacked as one [rows, numel] tensor: the task vectors
  x_i - B of the non-base sources (task-arithmetic family, with the base B), or the sources
  themselves (linear);
- magnitude sparsifiers (ties, breadcrumbs*): on CPU, each element's position (rank) in the
  order of its |delta| that the engine uses (mergekit's non-stable sort,
  `sparsify.magnitude_order`), so a density's cut is one integer comparison; on CUDA that order
  itself on the host, so a cut is two lookups and the mask one comparison of |delta| plus the
  tied elements at the cut, listed explicitly (masks.py);
- random sparsifiers (dare_*, della*): each source's mask uniforms (float64, generated once per
  mask seed); della also the per-row magnitude ranks, so keep probabilities are a table lookup;
- whole-tensor methods (slerp, nuslerp, multislerp, karcher, model_stock, nearswap,
  arcee_fusion, sce, ram, ramplus_tl, passthrough): every source, the base included, as rows;
  each candidate runs the method's own function on one whole tensor at a time (their norms,
  angles, quantiles and top-k need the whole tensor, so they are not chunked) and copies the
  result into the target.

The tensors are the engine's, bit for bit (`torch.equal` with `merge_state_dict` on the same
device and dtype). The package's modules, bottom to top: `memory` (what is held, and the memory
plan), `masks` (the sparsifiers' precomputed inputs and per-candidate masks), `chunked` (the
engine's operations over cache-sized chunks, with preallocated workspaces, so nothing grows from
candidate to candidate), `fused` (CPU, float32: compiled whole-tensor kernels for the
task-arithmetic family, checked against the chunked path) and this one. It imports neither
lm-eval nor optimizers.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

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
from evomerge.merge.inplace import lowrank
from evomerge.merge.inplace.chunked import ChunkedMath
from evomerge.merge.inplace.fused import FusedKernels
from evomerge.merge.inplace.masks import fill_uniforms, precompute
from evomerge.merge.inplace.memory import (
    CPU_CHUNK,
    PLACEMENTS,
    RANDOM_SPARSIFIERS,
    Entry,
    MemoryPlan,
    Placement,
    auto_plan,
    is_whole,
    make_staging,
    memory_plan_from_shapes,
    plan,
    probe_recipe,
)
from evomerge.methods.registry import TaskArithmeticMerge, TensorGroup, get_method
from evomerge.methods.sparsify import Sparsifier
from evomerge.models.sources import MergeError
from evomerge.models.tensor_names import checkpoint_views
from evomerge.recipes.parameter_space import Recipe, same_model


class InPlaceMerger:
    """Builds candidate recipes over fixed sources into one preallocated model, in place.

    `models`, `base_model` and `method` fix the sources (as a recipe's `models:` list, its
    `base_model` and `merge_method`); `build(recipe)` accepts any recipe over them with the same
    layer structure (slices whose sources are these models, in this order, each output layer
    taken from the same layer of every source) and any parameters, gradients, filters and mask
    seed.

    placement "resident": everything on `device`. "stream": the resident inputs stay in CPU
    memory (pinned when CUDA is available) and are copied to `device` tensor by tensor; only the
    target model and one tensor's staging and workspace buffers live on `device`. `dtype` or
    `placement` None: the memory plan's choice for these sources on `device` (memory.auto_plan:
    float32 before bfloat16, resident before stream), or its ValueError naming the shortfall.

    `fused`: on CPU in float32 with resident placement, build the task-arithmetic family's
    tensors with compiled whole-tensor kernels (checked against the chunked path on first use;
    any failure falls back to it). None (default): on for models of at least FUSED_MIN_PARAMS
    merged parameters, or as the environment's EVOMERGE_FUSED=1/0 says.
    """

    model: torch.nn.Module

    def __init__(self, models: Sequence[str], base_model: str | None, method: str, *,
                 device: str | torch.device = "cpu",
                 dtype: torch.dtype | str | None = torch.float32,
                 placement: Placement | None = "resident", allow_pickle: bool = False,
                 tokenizer_source: str | None = None, chunk: int | None = None,
                 fused: bool | None = None) -> None:
        if dtype is None or placement is None:  # left open: the memory plan's choice here
            chosen = auto_plan(models, base_model, method, device=device, dtype=dtype,
                               placement=placement, allow_pickle=allow_pickle)
            dtype, placement = chosen.dtype, chosen.placement  # type: ignore[assignment]
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
        probe = probe_recipe(models, base_model, method, tokenizer_source, self.dtype)
        self._plan: MergePlan = plan_merge(probe, allow_pickle=allow_pickle)  # every check
        self.num_layers = self._plan.donor.layout.num_layers
        self.source_order = tuple(
            s.model for s in probe.output_slices(self.num_layers)[0].sources)
        self._ta = isinstance(self.method, TaskArithmeticMerge)
        self._whole = is_whole(self.method)
        self._sparsifier: Sparsifier | None = getattr(self.method, "sparsifier", None)
        cuda = self.device.type == "cuda"
        self._host = torch.device("cpu") if placement == "stream" else self.device
        self._pin = placement == "stream" and torch.cuda.is_available()
        self._mask_seed: int | None = None
        # LoRA adapters of the base under task_arithmetic / linear: kept as factors (lowrank.py)
        self._lowrank = lowrank.applies(method, self._plan.sources, base_model)
        self._lowrank_entries: dict[str, lowrank.LowRankEntry] = {}

        self.model = self._make_model()
        # checkpoint names (the sources') -> the model's tensors under transformers' own names
        targets = checkpoint_views(self.model)
        self._entries: dict[str, Entry] = {}
        covered: dict[int, int] = {}  # storage -> elements written (fused tensors: several views)
        with ExitStack() as stack, torch.no_grad():
            for job in self._plan.jobs:
                param = targets.get(job.name)
                if param is None:
                    raise MergeError(f"{job.name}: the target model has no such tensor")
                key = param.untyped_storage().data_ptr()
                covered[key] = covered.get(key, 0) + param.numel()
                if self._lowrank:
                    self._lowrank_entries[job.name] = lowrank.make_entry(
                        job, self._plan, param.detach(), dtype=self.dtype, device=self.device,
                        stack=stack)
                    continue
                tensors = load_inputs(self._plan, job, stack, device=self._host,
                                      dtype=self.dtype)
                entry = self._make_entry(job, tensors, param.detach())
                if entry is not None:
                    self._entries[job.name] = entry
        uncovered = [k for k, p in self.model.named_parameters()
                     if covered.get(p.untyped_storage().data_ptr(), 0) < p.numel()]
        if uncovered:
            raise MergeError(f"the target model has parameters that no source provides: "
                             f"{uncovered[:5]}")
        largest = max((e.numel for e in self._entries.values()), default=1)
        rows = max((e.inputs.shape[0] for e in self._entries.values()), default=1)
        staging: dict[str, torch.Tensor] = {}
        if placement == "stream":
            staging = make_staging(rows, largest, self.device, self.dtype, self._ta,
                                   self._sparsifier)
        self._chunked = ChunkedMath(
            self.method, device=self.device, dtype=self.dtype, rows=rows, largest=largest,
            chunk=largest if cuda else min(largest, chunk or CPU_CHUNK), placement=placement,
            staging=staging)
        n_params = sum(e.numel for e in self._entries.values())
        self._fused_kernels = FusedKernels(self._chunked, fused, n_params=n_params, rows=rows)

    @property
    def _fused(self) -> bool:
        """Whether the fused kernels are on (they turn off for good after a failure)."""
        return self._fused_kernels.enabled

    @property
    def _fused_checked(self) -> set[tuple]:
        """The fused kernel variants already checked against the chunked path."""
        return self._fused_kernels.checked

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
                    target: torch.Tensor) -> Entry | None:
        first = tensors[0]
        if tuple(target.shape) != tuple(first.shape):
            raise MergeError(f"{job.name}: the target model's shape {list(target.shape)} differs "
                             f"from the sources' {list(first.shape)}")
        if not target.is_contiguous():
            raise MergeError(f"{job.name}: the loaded model holds it as a strided slice of a fused "
                             "tensor; the in-place merger writes contiguous tensors only")
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
        entry = Entry(name=job.name, shape=first.shape, numel=numel,
                      cols=first.shape[1] if first.dim() >= 2 else numel,
                      target=flat_target, inputs=self._place(rows), keys=keys, base=base)
        precompute(entry, self._sparsifier, on_cpu=self.device.type == "cpu", host=self._host,
                   place=self._place, device=self.device)  # sorted where the merge computes
        return entry

    def _ensure_uniforms(self, mask_seed: int) -> None:
        """Mask uniforms for `mask_seed`, (re)generated in place when the seed changes."""
        if self._mask_seed == mask_seed:
            return
        for e in self._entries.values():
            fill_uniforms(e, mask_seed, host=self._host, place=self._place)
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
        if self._sparsifier in RANDOM_SPARSIFIERS:
            self._ensure_uniforms(recipe.mask_seed)
        with torch.no_grad():
            for job in jobs:
                if self._lowrank:
                    try:
                        lowrank.build(self._lowrank_entries[job.name], job, self.method_name)
                    except ValueError as err:
                        raise MergeError(f"{job.name}: {err}") from None
                    continue
                entry = self._entries.get(job.name)
                if entry is None:
                    continue
                try:
                    if self._whole:
                        self._whole_tensor(entry, job)
                    elif self._ta:
                        self._task_arithmetic(entry, job)
                    else:
                        self._chunked.linear(entry, job)
                except ValueError as err:
                    raise MergeError(f"{job.name}: {err}") from None
        return self.model

    def _whole_tensor(self, e: Entry, job: TensorJob) -> None:
        """The method's own function on the whole tensor (rows: every source, in key order)."""
        inputs, _, _, _ = self._chunked.stage(e)
        tensors = {k: inputs[row].view(e.shape) for row, k in enumerate(e.keys)}
        group = TensorGroup(name=e.name, tensors=tensors, base=job.base)
        out = self.method.merge(group, job.shared, job.per_source,
                                mask_seed=self._mask_seed or 0)
        e.target.copy_(out.reshape(-1))

    def _task_arithmetic(self, e: Entry, job: TensorJob) -> None:
        # the fused kernels where they apply (they warn from here: stacklevel 4 is build's
        # caller), else the chunked path
        if not self._fused_kernels.run(e, job):
            self._chunked.task_arithmetic(e, job)


# plan and memory_plan_from_shapes live in memory.py; importable from here as before
__all__ = ["InPlaceMerger", "MemoryPlan", "memory_plan_from_shapes", "plan"]
