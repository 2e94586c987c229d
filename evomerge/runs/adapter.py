"""`evomerge materialize --adapter`: a merge of LoRA adapters written as one PEFT adapter.

A task-arithmetic merge of adapters is itself a LoRA: per targeted weight,

    base + sum_i c_i * s_i * B_i @ A_i = base + [c_1 s_1 B_1 | ... | c_n s_n B_n] @ [A_1; ...; A_n]

with c_i = lambda * w_i (divided by sum_i w_i when normalize), so the adapter has rank
sum_i r_i, scaling 1 (lora_alpha = r) and the recipe's per-tensor weights folded into B. A linear
merge is one too when its weights sum to its divisor (normalize: true, the default): then the base
term is the base. Every other case (other methods: their sparsified or rescaled deltas are not
low-rank; a full model among the sources; layers moved by slices; unnormalized linear weights) is
refused with the reason; materialize the full folder instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.core.errors import UsageError
from evomerge.core.io import atomic_write_text, replace_folder
from evomerge.models.tensor_files import ShardWriter, header_room

EXACT_METHODS = ("task_arithmetic", "linear")


def _refuse(reason: str) -> UsageError:
    return UsageError(f"--adapter: {reason}; materialize the full folder instead (without "
                      "--adapter)")


@dataclass(frozen=True)
class FactorPlan:
    """What the merged adapter is made of, checked before any factor is read: per targeted base
    tensor, each adapter source's coefficient (group key -> c_i)."""

    plan: object  # merge.plan.MergePlan
    base: object  # the base's SourceModel
    base_name: str
    coefs: dict[str, dict[int, float]]


def plan_factors(recipe) -> FactorPlan:
    """Every check of an adapter export; UsageError with the reason when it is not exact."""
    from evomerge.merge.engine import plan_merge, plan_source
    from evomerge.models.sources import AdapterSource

    method = recipe.merge_method
    if method not in EXACT_METHODS:
        raise _refuse(f"a {method} merge of LoRA adapters is not a LoRA (its deltas are "
                      "sparsified, rescaled or combined nonlinearly, so they are not the sum of "
                      "the adapters' low-rank products); only task_arithmetic and linear "
                      "merges export exactly")
    plan = plan_merge(recipe)
    base_name = recipe.base_model
    adapters = {n: s for n, s in plan.sources.items() if isinstance(s, AdapterSource)}
    if not adapters:
        raise _refuse("none of the recipe's sources is a LoRA adapter")
    bases = {str(Path(s.base_source.path).resolve()) for s in adapters.values()}
    if base_name is not None:
        bases.add(str(Path(plan_source(plan, base_name).path).resolve()))
    if len(bases) != 1:
        raise _refuse(f"the adapters are over different bases ({sorted(bases)})")
    base_path = bases.pop()
    base_source = next(iter(adapters.values())).base_source
    coefs: dict[str, dict[int, float]] = {}
    for job in plan.jobs:
        weights = {}
        for k, (model, name) in enumerate(zip(job.models, job.inputs, strict=True)):
            src = plan_source(plan, model)
            if not isinstance(src, AdapterSource) and str(Path(src.path).resolve()) != base_path:
                raise _refuse(f"{model} is a full model, not an adapter of the base")
            if name != job.name:
                raise _refuse(f"{job.name} is built from {name} of {model}: slices move layers")
            if method == "task_arithmetic" and k == job.base:
                continue
            weights[k] = job.per_source[k]["weight"]
        total = sum(weights.values())
        if method == "task_arithmetic":
            div = total if job.shared["normalize"] and abs(total) >= 1e-8 else 1.0
            coef = {k: job.shared["lambda"] * w / div for k, w in weights.items()}
        else:
            div = total if job.shared["normalize"] else 1.0
            if div == 0 or abs(total / div - 1) > 1e-12:
                raise _refuse(f"linear weights of {job.name} sum to {total:g} without normalize: "
                              "the base itself is scaled, which no adapter can express")
            coef = {k: w / div for k, w in weights.items()}
        coefs[job.name] = {k: c for k, c in coef.items()
                           if isinstance(plan_source(plan, job.models[k]), AdapterSource)}
    return FactorPlan(plan, base_source, base_name or base_source.name, coefs)


def iter_factors(fp: FactorPlan) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Per targeted base tensor, (name, B [out, R], A [R, in]) of the merged adapter (scaling 1),
    one tensor's factors read at a time."""
    from evomerge.merge.engine import plan_source

    for job in fp.plan.jobs:
        bs, as_ = [], []
        for k, c in fp.coefs[job.name].items():
            f = plan_source(fp.plan, job.models[k]).lora(job.name)
            if f is None:
                continue
            if f.fan_in_fan_out:
                raise _refuse("fan_in_fan_out adapters (GPT-2's Conv1D) are not exported yet")
            bs.append(f.b.to(torch.float32) * (c * f.scaling))
            as_.append(f.a.to(torch.float32))
        if bs:
            yield job.name, torch.cat(bs, dim=1), torch.cat(as_, dim=0)


def adapter_factors(recipe) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], object, str]:
    """Per targeted base tensor, (B [out, R], A [R, in]) of the merged adapter (scaling 1), all in
    memory; also the base's SourceModel and name. UsageError with the reason when not exact."""
    fp = plan_factors(recipe)
    return {n: (b, a) for n, b, a in iter_factors(fp)}, fp.base, fp.base_name


def _module(name: str) -> str:
    return name[: -len(".weight")]


def write_adapter(recipe, out: str | Path, *, force: bool = False, dtype: str = "float32",
                  note: str = "") -> Path:
    """Writes the merged adapter folder (staged, then renamed into place); returns its path.
    The factors stream into the weights file one targeted tensor at a time (as the merge engine
    writes shards): the merged adapter is never held whole."""
    from peft import LoraConfig

    from evomerge.merge.plan import DTYPES
    from evomerge.models.adapters import ADAPTER_WEIGHTS, FINGERPRINT_KEY, base_fingerprint

    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"{out} exists; pass --force to replace it")
    fp = plan_factors(recipe)  # every refusal before anything is written
    torch_dtype = DTYPES[dtype]
    staging = out.parent / f".{out.name}.adapter-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        names = [f"base_model.model.{_module(n)}.lora_{x}.weight" for n in fp.coefs for x in "AB"]
        weights = ShardWriter(staging / ADAPTER_WEIGHTS, header_room(names))
        ranks: dict[str, int] = {}
        try:
            for name, b, a in iter_factors(fp):
                m = _module(name)
                ranks[m] = b.shape[1]
                weights.add(f"base_model.model.{m}.lora_A.weight", a.to(torch_dtype))
                weights.add(f"base_model.model.{m}.lora_B.weight", b.to(torch_dtype))
                del a, b
            weights.metadata = {"format": "pt", FINGERPRINT_KEY: base_fingerprint(
                fp.base, [f"{m}.weight" for m in ranks])}
            weights.close()
        except BaseException:
            weights.abort()
            raise
        r = max(ranks.values())
        pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
        config = LoraConfig(r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern),
                            target_modules=sorted({m.rsplit(".", 1)[-1] for m in ranks}),
                            lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                            base_model_name_or_path=str(fp.base_name))
        config.save_pretrained(str(staging))
        card = [f"# LoRA adapter merged by evomerge ({recipe.merge_method})", "",
                f"Base: `{fp.base_name}`. Rank {r} (the sum of the merged adapters' ranks), "
                "scaling 1.", "", note, "", "## Recipe", "", "```yaml", recipe.to_yaml().strip(),
                "```", ""]
        atomic_write_text(staging / "README.md", "\n".join(card))
        atomic_write_text(staging / "evomerge_recipe.json",
                          json.dumps({"recipe_hash": recipe.hash()}, indent=2) + "\n")
        replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def materialize_adapter(run_dir: str | Path, out: str | Path, *, rank: int = 1,
                        force: bool = False) -> tuple[Path, dict]:
    """The run's rank-th best recipe as a PEFT adapter folder."""
    from evomerge.runs.export import describe, recipe_from_run

    recipe, record = recipe_from_run(run_dir, rank)
    note = f"Found by `evomerge search` in `{run_dir}` (rank {rank}: {describe(record)})."
    path = write_adapter(recipe, out, force=force, note=note)
    r = json.loads((path / "adapter_config.json").read_text())["r"]
    return path, {"record": record, "recipe_hash": recipe.hash(), "r": r}
