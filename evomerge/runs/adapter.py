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
from pathlib import Path

import torch

from evomerge.core.errors import UsageError
from evomerge.core.io import atomic_write_text, replace_folder

EXACT_METHODS = ("task_arithmetic", "linear")


def _refuse(reason: str) -> UsageError:
    return UsageError(f"--adapter: {reason}; materialize the full folder instead (without "
                      "--adapter)")


def adapter_factors(recipe) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], object, str]:
    """Per targeted base tensor, (B [out, R], A [R, in]) of the merged adapter (scaling 1);
    also the base's SourceModel and name. UsageError with the reason when not exact."""
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
    base_name = base_name or base_source.name
    factors: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
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
        for k, c in coef.items():
            src = plan_source(plan, job.models[k])
            f = src.lora(job.name) if isinstance(src, AdapterSource) else None
            if f is None:
                continue
            if f.fan_in_fan_out:
                raise _refuse("fan_in_fan_out adapters (GPT-2's Conv1D) are not exported yet")
            bs, as_ = factors.setdefault(job.name, ([], []))
            bs.append(f.b.to(torch.float32) * (c * f.scaling))
            as_.append(f.a.to(torch.float32))
    merged = {n: (torch.cat(b, dim=1), torch.cat(a, dim=0)) for n, (b, a) in factors.items()}
    return merged, base_source, base_name


def write_adapter(recipe, out: str | Path, *, force: bool = False, dtype: str = "float32",
                  note: str = "") -> Path:
    """Writes the merged adapter folder (staged, then renamed into place); returns its path."""
    from peft import LoraConfig
    from safetensors.torch import save

    from evomerge.core.io import write_durable
    from evomerge.merge.plan import DTYPES
    from evomerge.models.adapters import ADAPTER_WEIGHTS, FINGERPRINT_KEY, base_fingerprint

    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"{out} exists; pass --force to replace it")
    factors, base, base_name = adapter_factors(recipe)
    modules = {n[: -len(".weight")]: bf for n, bf in factors.items()}
    ranks = {m: b.shape[1] for m, (b, _) in modules.items()}
    r = max(ranks.values())
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    config = LoraConfig(r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern),
                        target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        base_model_name_or_path=str(base_name))
    torch_dtype = DTYPES[dtype]
    tensors = {}
    for m, (b, a) in sorted(modules.items()):
        tensors[f"base_model.model.{m}.lora_A.weight"] = a.to(torch_dtype).contiguous()
        tensors[f"base_model.model.{m}.lora_B.weight"] = b.to(torch_dtype).contiguous()
    meta = {"format": "pt", FINGERPRINT_KEY: base_fingerprint(base, list(factors))}
    staging = out.parent / f".{out.name}.adapter-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        config.save_pretrained(str(staging))
        write_durable(staging / ADAPTER_WEIGHTS, save(tensors, metadata=meta))
        card = [f"# LoRA adapter merged by evomerge ({recipe.merge_method})", "",
                f"Base: `{base_name}`. Rank {r} (the sum of the merged adapters' ranks), "
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
