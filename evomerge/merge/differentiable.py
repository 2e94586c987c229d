"""A recipe's merged tensors as a differentiable function of its per-source weights.

For gradient descent on a recipe's coefficients (search/refine.py): per output tensor, what the
method computes with every other choice frozen at a start recipe, so that only the weights vary:

    merged(w) = B + scale * sum_i w_i m_i D_i / divisor(w)

- task-arithmetic family (task_arithmetic, ties, dare_*, breadcrumbs*, della*): D_i the source's
  sparsified task vector (its mask depends on no weight), m_i TIES's sign consensus at the start
  weights (frozen: the election is a step function), divisor sum_i w_i m_i with ``normalize``,
  scale ``lambda``;
- linear: B = 0, D_i the sources, divisor sum_i w_i with ``normalize``;
- tsv: D_i each task's block of the decorrelated TSV matrix (methods/tsv.py ``tsv_parts``: exact
  for positive weights), or task vector / T for tensors that are not task matrices; scale alpha.

Other methods are refused with the reason. Memory: per tensor B and the T stacked D_i (and the
masks), i.e. (T + 1) times the model in the merge dtype: the merged model itself is never stored,
each forward pass computes it inside the autograd graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from evomerge.core.errors import ConfigError
from evomerge.merge.engine import MergePlan, TensorJob, load_inputs, plan_jobs
from evomerge.methods.base import MergeMethod, TensorGroup
from evomerge.methods.generalized import Consensus, TaskArithmeticMerge, sign_consensus
from evomerge.methods.registry import get_method, registered_methods
from evomerge.methods.spectral import is_task_matrix
from evomerge.methods.tsv import tsv_parts
from evomerge.recipes.parameter_space import Recipe

_OTHER_FORMS = ("linear", "tsv")  # differentiated here besides the task-arithmetic family


def _differentiable(method: MergeMethod) -> bool:
    return isinstance(method, TaskArithmeticMerge) or method.name in _OTHER_FORMS


def refusal(method: str) -> str | None:
    """Why ``method``'s coefficients cannot be trained by gradient (None: they can); the
    supported methods are read from the registry, so a new task-arithmetic method is one too."""
    if _differentiable(get_method(method)):
        return None
    supported = ", ".join(m.name for m in registered_methods() if _differentiable(m))
    return (f"method {method!r} is not differentiated by refine (its merged tensor is not a weighted sum "
            f"of fixed directions); supported: {supported}")


@dataclass(frozen=True)
class TensorForm:
    """One output tensor as a function of its sources' weights (their order: ``keys``)."""

    name: str
    keys: tuple[int, ...]  # group keys (source index in the slice) of the weighted sources
    base: torch.Tensor | None
    directions: torch.Tensor  # [T, *shape]
    masks: torch.Tensor | None  # [T, *shape] bool, TIES's frozen consensus
    scale: float
    normalize: bool

    def merged(self, w: torch.Tensor) -> torch.Tensor:
        """The merged tensor for the weights ``w`` (shape [T]), differentiable in ``w``."""
        shape = (len(self.keys),) + (1,) * (self.directions.dim() - 1)
        ww = w.to(self.directions.dtype).reshape(shape)
        if self.masks is not None:
            mixed = (ww * self.masks * self.directions).sum(dim=0)
            divisor = (ww * self.masks).sum(dim=0)
            divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        else:
            mixed = (ww * self.directions).sum(dim=0)
            total = ww.sum()
            divisor = torch.where(total.abs() < 1e-8, torch.ones_like(total), total)
        if self.normalize:
            mixed = mixed / divisor
        mixed = self.scale * mixed
        return mixed if self.base is None else self.base + mixed


def _task_arithmetic(method: TaskArithmeticMerge, job: TensorJob, group: TensorGroup, mask_seed: int) -> TensorForm:
    keys = tuple(sorted(k for k in group.tensors if k != group.base))
    deltas = method.task_deltas(group, job.shared, job.per_source, mask_seed=mask_seed)
    masks = None
    if method.consensus is Consensus.SUM:
        w = torch.tensor([job.per_source[k]["weight"] for k in keys], dtype=deltas.dtype)
        masks = sign_consensus(deltas * w.reshape((len(keys),) + (1,) * (deltas.dim() - 1)))
    return TensorForm(job.name, keys, group.tensors[group.base], deltas, masks, float(job.shared["lambda"]),
                      bool(job.shared["normalize"]))


def _linear(job: TensorJob, group: TensorGroup) -> TensorForm:
    keys = tuple(sorted(group.tensors))
    stacked = torch.stack([group.tensors[k].float() for k in keys])
    return TensorForm(job.name, keys, None, stacked, None, 1.0, bool(job.shared["normalize"]))


def _tsv(job: TensorJob, group: TensorGroup) -> TensorForm:
    base = group.tensors[group.base]
    keys = tuple(sorted(k for k in group.tensors if k != group.base))
    deltas = [group.tensors[k].float() - base.float() for k in keys]
    if is_task_matrix(job.name, base):
        parts, scale = tsv_parts(deltas, job.shared["rank_fraction"]), float(job.shared["alpha"])
    else:
        parts, scale = deltas, float(job.shared["alpha"]) / len(keys)
    return TensorForm(job.name, keys, base.float(), torch.stack(parts), None, scale, False)


def tensor_forms(plan: MergePlan, recipe: Recipe, *, dtype: torch.dtype = torch.float32,
                 keep: Callable[[TensorJob], bool] = lambda job: True) -> dict[str, tuple[TensorForm, TensorJob]]:
    """Every output tensor of ``recipe`` over ``plan``'s sources as a `TensorForm`, with its job
    (whose resolved parameters are the start recipe's); ``keep`` selects the tensors."""
    reason = refusal(recipe.merge_method)
    if reason:
        raise ConfigError(reason)
    if plan.vocab is not None:
        raise ConfigError("refine: a recipe with a tokenizer_source is not supported")
    method = plan.method
    out: dict[str, tuple[TensorForm, TensorJob]] = {}
    with ExitStack() as stack, torch.no_grad():
        for job in plan_jobs(recipe, plan):
            if not keep(job):
                continue
            tensors: Mapping[int, torch.Tensor] = load_inputs(plan, job, stack, dtype=dtype)
            tensors = {k: t.clone() for k, t in tensors.items()}  # not views of mapped files
            group = TensorGroup(name=job.name, tensors=tensors, base=job.base)
            if isinstance(method, TaskArithmeticMerge):
                form = _task_arithmetic(method, job, group, recipe.mask_seed)
            elif recipe.merge_method == "linear":
                form = _linear(job, group)
            else:
                form = _tsv(job, group)
            out[job.name] = (form, job)
    return out
