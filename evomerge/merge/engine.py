"""The merge engine: a checked plan (plan.py) -> merged tensors -> Hugging Face folder.

All input checks happen while planning, before any tensor is read. This module imports neither
lm-eval nor optimizers: an in-place merger reuses it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from threading import Event
from typing import Any

import torch

from evomerge.core.io import fsync_dir, umask, write_durable
from evomerge.merge.card import model_card, source_hashes
from evomerge.merge.plan import (
    DTYPES,
    MergePlan,
    TensorJob,
    VocabMap,
    _dtype_name,
    plan_jobs,
    plan_merge,
    plan_source,
)
from evomerge.methods.registry import TensorGroup, merge_group
from evomerge.models.sources import MergeError, is_vocab_tensor
from evomerge.models.tensor_files import ShardWriter, header_room
from evomerge.recipes.parameter_space import Recipe

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE", "DTYPES", "MergePlan", "TensorJob", "VocabMap", "iter_merged",
    "load_inputs", "merge_state_dict", "plan_jobs", "plan_merge", "plan_source",
    "write_merged_model",
]

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # as mergekit and the CLI ("5GB")


# --- merging ------------------------------------------------------------------------------------


def _permute_vocab(tensors: dict[int, torch.Tensor], models: tuple[str, ...], base: int | None,
                   vocab: VocabMap) -> dict[int, torch.Tensor]:
    """Re-index token rows to the output tokenizer, filling missing rows as mergekit does.

    A token that a model lacks gets: the row of the only model that has it; else the base's row
    if the base is an input and has it; else the mean of the rows that exist; zero if none has it.
    """
    keys = list(tensors)
    dtype = tensors[keys[0]].dtype
    for t in tensors.values():
        dtype = torch.promote_types(dtype, t.dtype)
    device = tensors[keys[0]].device
    rest = tensors[keys[0]].shape[1:]
    present, rows = [], []
    for k in keys:
        p = vocab.rows[models[k]].to(device)
        row = torch.zeros((vocab.size, *rest), dtype=dtype, device=device)
        have = p >= 0
        row[have] = tensors[k][p[have]].to(dtype)
        present.append(have)
        rows.append(row)
    have_all = torch.stack(present)  # [models, vocab]
    stacked = torch.stack(rows)
    count = have_all.sum(0)
    expand = (-1,) + (1,) * len(rest)
    mean = stacked.sum(0) / count.clamp(min=1).reshape(expand).to(dtype)
    default = torch.where((count == 1).reshape(expand), stacked.sum(0), mean)
    if base is not None:
        b = keys.index(base)
        use_base = ((count > 1) & have_all[b]).reshape(expand)
        default = torch.where(use_base, stacked[b], default)
    return {k: torch.where(have_all[i].reshape(expand), stacked[i], default)
            for i, k in enumerate(keys)}


def iter_merged(plan: MergePlan, *, device: str | torch.device = "cpu",
                dtype: torch.dtype | str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Merged tensors one by one (name, tensor on `device`), in output order.

    `dtype` overrides the recipe's `dtype` (the dtype inputs are cast to before merging); the
    output is cast to the recipe's `out_dtype` if it names one.
    """
    compute = _dtype_name(dtype) or plan.recipe.dtype
    with ExitStack() as stack:
        for job in plan.jobs:
            out = merge_job(plan, job, stack, device=device, dtype=compute)
            yield job.name, out
            del out  # one tensor group at a time: nothing of this job is held while the next is read


def merge_job(plan: MergePlan, job: TensorJob, stack: ExitStack, *,
              device: str | torch.device = "cpu", dtype: str | None = None) -> torch.Tensor:
    """One output tensor from its inputs, read for it alone (freed when this returns)."""
    tensors = load_inputs(plan, job, stack, device=device, dtype=dtype)
    group = TensorGroup(name=job.name, tensors=tensors, base=job.base)
    if getattr(plan.method, "needs_factors", False):  # lorahub: the adapters' factors
        group = factor_group(plan, job, group)
    try:
        out = merge_group(plan.method, group, job.shared, job.per_source,
                          mask_seed=plan.recipe.mask_seed)
    except ValueError as err:
        raise MergeError(f"{job.name}: {err}") from None
    out_dtype = plan.recipe.out_dtype
    if out_dtype and out.is_floating_point():
        out = out.to(DTYPES[out_dtype])
    return out


def factor_group(plan: MergePlan, job: TensorJob, group: TensorGroup) -> TensorGroup:
    """`group` with the LoRA factors of its adapter sources (methods.lorahub.FactorGroup)."""
    from evomerge.methods.lorahub import FactorGroup

    factors = {k: src.lora(name) for k, (model, name) in enumerate(zip(job.models, job.inputs,
                                                                      strict=True))
               if hasattr(src := plan_source(plan, model), "lora") and k != job.base}
    return FactorGroup(name=group.name, tensors=group.tensors, base=group.base, factors=factors)


def load_inputs(plan: MergePlan, job: TensorJob, stack: ExitStack, *,
                device: str | torch.device = "cpu",
                dtype: torch.dtype | str | None = None) -> dict[int, torch.Tensor]:
    """The input tensors of one job (group key -> tensor on `device`), as the merge sees them.

    Floating-point tensors are cast to `dtype` if given; token rows are re-indexed to the output
    tokenizer when the recipe names a tokenizer_source.
    """
    compute = _dtype_name(dtype)
    tensors: dict[int, torch.Tensor] = {}
    for k, (model, name) in enumerate(zip(job.models, job.inputs, strict=True)):
        t = plan_source(plan, model).read(name, stack).to(device)
        if compute and t.is_floating_point():
            t = t.to(DTYPES[compute])
        tensors[k] = t
    if plan.vocab is not None and is_vocab_tensor(job.name):
        tensors = _permute_vocab(tensors, job.models, job.base, plan.vocab)
    return tensors


def merge_state_dict(recipe: Recipe, device: str | torch.device = "cpu",
                     dtype: torch.dtype | str | None = None,
                     allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The whole merged model in memory: output tensor name -> tensor (on CPU)."""
    plan = plan_merge(recipe, allow_pickle=allow_pickle)
    return {name: t.cpu() for name, t in iter_merged(plan, device=device, dtype=dtype)}


# --- writing a Hugging Face folder --------------------------------------------------------------

_TOKENIZER_COPY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt",
                   "vocab.txt", "chat_template.jinja", "chat_template.json")


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def write_merged_model(recipe: Recipe, out_dir: str | os.PathLike, *,
                       device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                       force: bool = False, allow_pickle: bool = False,
                       max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                       known_hashes: Mapping[Path, str] | None = None) -> Path:
    """Merge and write a Hugging Face folder; returns its path.

    `known_hashes`: sources' file hashes the caller computed already (materialize checks them
    against the run folder's record), used in the card instead of hashing those files again.

    The folder is built under a temporary sibling name, fsynced and renamed into place when
    complete. An existing `out_dir` is refused unless `force`; with `force` it is replaced only
    after the new folder is complete, so a failed merge loses nothing.
    """
    out = Path(out_dir)
    if out.exists() and not force:
        raise MergeError(f"{out} exists; pass --force (force=True) to replace it")
    if max_shard_size <= 0:
        raise MergeError("max_shard_size must be positive")
    plan = plan_merge(recipe, allow_pickle=allow_pickle)  # all input checks happen here
    if dtype is not None and not recipe.out_dtype:
        plan.out_config["dtype"] = _dtype_name(dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~umask())  # the folder is renamed into place: give it mkdir's mode, not mkdtemp's 0700
    # The card's source hashes are read beside the merge (hashlib and file reads release the
    # GIL): they would otherwise read every source a second time after it.
    hashing, stop = ThreadPoolExecutor(1, thread_name_prefix="evomerge-sha256"), Event()
    try:
        hashes = hashing.submit(source_hashes, plan, stop, known_hashes)
        _write_shards(plan, tmp, max_shard_size, device=device, dtype=dtype)
        write_durable(tmp / "config.json", _json_bytes(plan.out_config))
        _copy_extras(plan, tmp)
        write_durable(tmp / "README.md", model_card(plan, hashes.result()).encode("utf-8"))
        fsync_dir(tmp)
        _swap_into_place(tmp, out, force)
    except BaseException:
        stop.set()
        hashing.shutdown(cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    hashing.shutdown()
    return out


def _write_shards(plan: MergePlan, tmp: Path, max_shard_size: int, *,
                  device: str | torch.device, dtype: torch.dtype | str | None) -> None:
    """The merged tensors streamed into safetensors shards in `tmp`, each tensor written as
    soon as it is merged and then released: a shard is never held in memory. A shard is closed
    before the tensor that would take it past `max_shard_size` (as mergekit does); shards are
    named once their count is known, with an index when there are several."""
    room = header_room([job.name for job in plan.jobs])
    shards: list[ShardWriter] = []
    total = 0
    try:
        for name, tensor in iter_merged(plan, device=device, dtype=dtype):
            _check_finite(name, tensor)
            size = tensor.numel() * tensor.element_size()
            if not shards or (shards[-1].entries and shards[-1].size + size > max_shard_size):
                if shards:
                    shards[-1].close()
                shards.append(ShardWriter(tmp / f"part-{len(shards) + 1}.safetensors", room,
                                          metadata={"format": "pt"}))
            shards[-1].add(name, tensor)
            total += size
            del tensor  # released before the next tensor's inputs are read
        if not shards:
            shards.append(ShardWriter(tmp / "part-1.safetensors", room, {"format": "pt"}))
        shards[-1].close()
    except BaseException:
        for shard in shards:
            shard.abort()
        raise
    if len(shards) == 1:
        os.replace(shards[0].path, tmp / "model.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.replace(shard.path, tmp / final)
        weight_map.update({n: final for n in shard.entries})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_durable(tmp / "model.safetensors.index.json", _json_bytes(index))


_FINITE_CHUNK = 1 << 24  # elements checked at a time: the check's bool mask stays small


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    """A merged model with NaN or infinite weights is never written (nor a part of it)."""
    if not tensor.is_floating_point():
        return
    # A finite sum means every element is finite (a NaN or an infinity makes the sum NaN or
    # infinite): one pass, no mask. A sum that overflows is checked element by element.
    if bool(torch.isfinite(tensor.sum())):
        return
    flat = tensor.reshape(-1)
    if all(bool(torch.isfinite(flat[i:i + _FINITE_CHUNK]).all())
           for i in range(0, flat.numel(), _FINITE_CHUNK)):
        return
    nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
    raise MergeError(
        f"{name}: the merged tensor has non-finite values ({nan} NaN, {inf} infinite of "
        f"{tensor.numel()}); nothing was written. Check the recipe's weights, lambda and dtype "
        "for this tensor (a float16 or bfloat16 merge can overflow)"
    )


def _copy_extras(plan: MergePlan, tmp: Path) -> None:
    """Tokenizer files, generation config and chat template, byte for byte from the donors."""
    tok_src = plan.tokenizer_donor or plan.donor
    for name in _TOKENIZER_COPY:
        if (tok_src.path / name).is_file():
            write_durable(tmp / name, (tok_src.path / name).read_bytes())
    gen_src = next((s for s in (plan.donor, *plan.sources.values())
                    if (s.path / "generation_config.json").is_file()), None)
    if gen_src is not None:
        write_durable(tmp / "generation_config.json",
                    (gen_src.path / "generation_config.json").read_bytes())
    template = plan.recipe.chat_template
    if template == "auto":
        template = _most_common_template(plan)
    if template:
        write_durable(tmp / "chat_template.jinja", template.encode("utf-8"))
        (tmp / "chat_template.json").unlink(missing_ok=True)
        config_file = tmp / "tokenizer_config.json"
        if config_file.is_file():  # a template in tokenizer_config.json would compete with it
            tok_config = json.loads(config_file.read_text(encoding="utf-8"))
            if tok_config.pop("chat_template", None) is not None:
                write_durable(config_file, _json_bytes(tok_config))


def _most_common_template(plan: MergePlan) -> str | None:
    counts: dict[str, int] = {}
    for s in plan.sources.values():
        text = None
        if (s.path / "chat_template.jinja").is_file():
            text = (s.path / "chat_template.jinja").read_text(encoding="utf-8")
        elif (s.path / "tokenizer_config.json").is_file():
            value = json.loads((s.path / "tokenizer_config.json").read_text()).get(
                "chat_template")
            text = value if isinstance(value, str) else None
        if text:
            counts[text] = counts.get(text, 0) + 1
    # Ties go to the template seen first (sources in recipe order), so the choice is stable.
    return max(counts, key=lambda k: counts[k]) if counts else None


def _swap_into_place(tmp: Path, out: Path, force: bool) -> None:
    if not out.exists():
        os.replace(tmp, out)
        fsync_dir(out.parent)
        return
    if not force:
        raise MergeError(f"{out} exists; pass --force (force=True) to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)  # put the previous folder back
        raise
    fsync_dir(out.parent)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()
