"""Refine: a recipe's weight genes trained by gradient descent through the merged model.

The coefficient-space ceiling of issue 29: how far the search's own space goes when the
optimizer is a gradient instead of an evolution. From a start genome (the run's winner, or its
best plain merge), the genes of the space's ``weight`` parameter (a weight per source per layer
group, as the space defines them) become torch parameters in the unit cube; every other gene (a
density, TSV's rank fraction, lambda) and every mask stay at the start's values. Each step merges
the weights differentiably (merge/differentiable.py) into one resident model's forward pass
(``torch.func.functional_call``: the model's own tensors are never written), takes the loss on a
batch of the search split's items (evaluation/evaluator.py ``answers``) and makes one Adam step;
the genes are then clipped to the cube, so the result is a genome the codec decodes, the run logs
and the export writes. Seeded and, on CPU, deterministic.

Objectives: ``cross_entropy``, each item's answer's negative log-likelihood (the sum over its
tokens), the default; ``entropy``, the label-free AdaMerging objective (Yang et al., ICLR 2024):
the entropy of the predictive distribution at the answer's positions. Either is the tasks'
weighted mean, with the fitness's weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import torch

from evomerge.core.errors import ConfigError
from evomerge.evaluation.evaluator import Answer, answers
from evomerge.evaluation.fitness import Samples
from evomerge.merge.differentiable import TensorForm, refusal, tensor_forms
from evomerge.merge.engine import plan_jobs, plan_merge
from evomerge.models.tensor_names import checkpoint_views
from evomerge.search.codecs.parameter import Codec

WEIGHT = "weight"  # the per-source parameter refine trains
ITEM_DRAW = 7919  # the seed stream of refine's training items (a search's streams are its generations)


class Objective(StrEnum):
    CROSS_ENTROPY = "cross_entropy"
    ENTROPY = "entropy"


@dataclass(frozen=True)
class RefineOptions:
    steps: int = 200
    lr: float = 0.05  # Adam's step, in units of each gene's range
    batch_items: int = 16  # items per task in one step
    items: int | None = None  # training items per task, a seeded subset of the search split (None: all)
    objective: Objective = Objective.CROSS_ENTROPY
    seed: int = 0

    def check(self) -> None:
        for name in ("steps", "batch_items"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"refine: {name} must be a positive integer (got {v!r})")
        if self.items is not None and (isinstance(self.items, bool) or self.items < 1):
            raise ConfigError(f"refine: items must be a positive integer (got {self.items!r})")
        if not (isinstance(self.lr, int | float) and np.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"refine: lr must be a positive number (got {self.lr!r})")


@dataclass
class RefineResult:
    genome: np.ndarray
    start_genome: np.ndarray
    trained: list[int]  # the genes trained (indices into the codec's genes)
    start_loss: float  # on every training item
    end_loss: float
    losses: list[float] = field(default_factory=list)  # each step's batch loss


def check_refinable(codec) -> None:
    """Refused before anything is loaded: a space whose genome is not a parameter-space recipe with
    weights of a differentiable method."""
    if not isinstance(codec, Codec):
        raise ConfigError("refine: only parameter-space runs can be refined (a data-flow genome is a "
                          "path of layers, not coefficients)")
    reason = refusal(codec.space.method)
    if reason:
        raise ConfigError(f"refine: {reason}")
    if not any(g.param == WEIGHT for g in codec.genes):
        raise ConfigError("refine: the run's space searches no weight genes")


def training_samples(tasks, evaluators, n: int | None, seed: int) -> Samples:
    """Each task's training items: its whole search split, or ``n`` of them drawn by ``seed``."""
    out: Samples = {}
    for i, t in enumerate(tasks):
        total = evaluators[t.name].n_docs(t.name)
        if n is None or n >= total:
            out[t.name] = None
        else:
            rng = np.random.default_rng([seed, ITEM_DRAW, i])
            out[t.name] = sorted(int(j) for j in rng.choice(total, size=n, replace=False))
    return out


def gene_map(codec: Codec, genome: np.ndarray, plan) -> tuple[list[int], dict[str, list[int | None]]]:
    """Which weight gene feeds each source's weight of each tensor, read off the codec's own
    recipe: the weight genes are set to distinct values and each tensor's resolved weight names
    its gene (None: a weight no gene sets). Returns the weight genes and {tensor: per group key}."""
    idx = [i for i, g in enumerate(codec.genes) if g.param == WEIGHT]
    x = np.array(genome, dtype=np.float64)
    for j, i in enumerate(idx):
        x[i] = (j + 1) / (len(idx) + 1)
    value_gene = {codec.genes[i].value(x[i]): i for i in idx}
    if len(value_gene) < len(idx):  # genes of other bounds decoded to one value: the map would be wrong
        raise ConfigError("refine: the space's weight genes cannot be told apart by their decoded values "
                          "(their bounds differ); this space cannot be refined")
    out = {}
    for job in plan_jobs(codec.to_recipe(x), plan):
        out[job.name] = [value_gene.get(job.per_source[k].get(WEIGHT)) for k in range(len(job.models))]
    return idx, out


def _param_names(model: torch.nn.Module, names) -> dict[str, str]:
    """Checkpoint tensor name -> the model's parameter that is exactly that tensor."""
    views = checkpoint_views(model)
    params = {(p.data_ptr(), tuple(p.shape)): n for n, p in model.named_parameters()}
    out = {}
    for name in names:
        v = views.get(name)
        key = None if v is None else (v.data_ptr(), tuple(v.shape))
        if key not in params:
            raise ConfigError(f"refine: tensor {name} is not one parameter of the loaded model (a fused or "
                              "converted tensor); this architecture cannot be refined")
        out[name] = params[key]
    return out


class _Batches:
    """The training items as padded token batches."""

    def __init__(self, items: list[Answer], pad: int):
        self.items, self.pad = items, pad
        self.by_task: dict[str, list[int]] = {}
        for j, a in enumerate(items):
            self.by_task.setdefault(a.task, []).append(j)

    def tensors(self, rows: list[int]):
        seqs = [self.items[j].context + self.items[j].answer for j in rows]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        target = torch.zeros((len(rows), width), dtype=torch.bool)  # the positions whose next token is an answer's
        for r, (j, s) in enumerate(zip(rows, seqs, strict=True)):
            ids[r, :len(s)] = torch.tensor(s)
            attn[r, :len(s)] = 1
            c = len(self.items[j].context)
            target[r, c - 1:len(s) - 1] = True
        return ids, attn, target


def _item_losses(logits: torch.Tensor, ids: torch.Tensor, target: torch.Tensor, objective: Objective) -> torch.Tensor:
    """Per item: the answer's summed token NLL, or the mean entropy at its positions."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    mask = target[:, :-1]
    if objective is Objective.CROSS_ENTROPY:
        nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        return (nll * mask).sum(dim=1)
    ent = -(logp.exp() * logp).sum(dim=-1)
    return (ent * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


class Refiner:
    """The trainable weights of one start genome over a resident model."""

    def __init__(self, codec: Codec, genome: np.ndarray, model: torch.nn.Module, *, allow_pickle: bool = False):
        self.codec, self.model = codec, model
        self.start = np.array(genome, dtype=np.float64)
        recipe = codec.to_recipe(self.start)
        plan = plan_merge(recipe, allow_pickle=allow_pickle)
        self.genes, by_tensor = gene_map(codec, self.start, plan)
        trained = {name for name, gs in by_tensor.items() if any(g is not None for g in gs)}
        dtype = next(model.parameters()).dtype
        forms = tensor_forms(plan, recipe, dtype=dtype, keep=lambda job: job.name in trained)
        self.forms: list[tuple[str, TensorForm, torch.Tensor, torch.Tensor]] = []
        names = _param_names(model, forms)
        pos = {g: j for j, g in enumerate(self.genes)}
        for name, (form, job) in forms.items():
            gs = [by_tensor[name][k] for k in form.keys]
            index = torch.tensor([pos[g] if g is not None else 0 for g in gs])
            fixed = torch.tensor([float(job.per_source[k][WEIGHT]) if g is None else float("nan")
                                  for k, g in zip(form.keys, gs, strict=True)], dtype=torch.float64)
            self.forms.append((names[name], form, index, fixed))
        g = codec.genes
        self.low = torch.tensor([g[i].low for i in self.genes], dtype=torch.float64)
        self.span = torch.tensor([g[i].high - g[i].low for i in self.genes], dtype=torch.float64)
        self.theta = torch.tensor(self.start[self.genes], dtype=torch.float64, requires_grad=True)

    def params(self) -> dict[str, torch.Tensor]:
        """The merged tensors for the current genes (in the autograd graph of ``theta``)."""
        values = self.low + self.theta * self.span
        out = {}
        for pname, form, index, fixed in self.forms:
            w = torch.where(torch.isnan(fixed), values[index], fixed)
            out[pname] = form.merged(w).to(next(self.model.parameters()).dtype)
        return out

    def loss(self, batches: _Batches, rows_by_task: dict[str, list[int]], weights: dict[str, float],
             objective: Objective) -> torch.Tensor:
        params = self.params()
        total = torch.zeros((), dtype=torch.float64)
        for task, rows in rows_by_task.items():
            ids, attn, target = batches.tensors(rows)
            out = torch.func.functional_call(self.model, params, (), {"input_ids": ids, "attention_mask": attn})
            total = total + weights[task] * _item_losses(out.logits, ids, target, objective).mean().double()
        return total / sum(weights[t] for t in rows_by_task)

    def genome(self) -> np.ndarray:
        x = self.start.copy()
        x[self.genes] = self.theta.detach().numpy()
        return x


def refine(codec: Codec, genome: np.ndarray, model: torch.nn.Module, tokenizer, tasks, evaluators,
           options: RefineOptions, *, allow_pickle: bool = False) -> RefineResult:
    """Trains ``genome``'s weight genes on the tasks' search-split items; ``model`` is a resident
    model of the run's architecture (its tensors are not changed)."""
    options.check()
    check_refinable(codec)
    samples = training_samples(tasks, evaluators, options.items, options.seed)
    items: list[Answer] = []
    for t in tasks:
        evaluator = evaluators[t.name]
        if not hasattr(evaluator, "task"):
            raise ConfigError(f"refine: task {t.name!r}'s evaluator does not expose lm-eval's tasks")
        items += answers(evaluator, model, tokenizer, {t.name: samples[t.name]})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = _Batches(items, pad)
    weights = {t.name: float(t.weight) for t in tasks}
    r = Refiner(codec, genome, model, allow_pickle=allow_pickle)
    opt = torch.optim.Adam([r.theta], lr=options.lr)
    model.eval()

    def full_loss() -> float:
        with torch.no_grad():
            chunks = {t: [rows[i:i + options.batch_items] for i in range(0, len(rows), options.batch_items)]
                      for t, rows in batches.by_task.items()}
            per_task = {}
            for t, parts in chunks.items():
                n = sum(len(p) for p in parts)
                per_task[t] = sum(float(r.loss(batches, {t: p}, weights, options.objective)) * len(p)
                                  for p in parts) / n
            return sum(weights[t] * v for t, v in per_task.items()) / sum(weights[t] for t in per_task)

    start_loss = full_loss()
    losses = []
    for step in range(options.steps):
        rng = np.random.default_rng([options.seed, step])
        rows = {t: sorted(int(j) for j in rng.choice(pool, size=min(options.batch_items, len(pool)), replace=False))
                for t, pool in batches.by_task.items()}
        opt.zero_grad()
        loss = r.loss(batches, rows, weights, options.objective)
        loss.backward()
        opt.step()
        with torch.no_grad():
            r.theta.clamp_(0.0, 1.0)  # the cube: the genome stays one the codec decodes
        losses.append(float(loss.detach()))
    return RefineResult(r.genome(), r.start, r.genes, start_loss, full_loss(), losses)
