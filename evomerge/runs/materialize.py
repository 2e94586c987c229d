"""`evomerge materialize`: a run's winner (or N-th best) as a Hugging Face folder.

The folder is the merge writer's (safetensors, config, tokenizer, model card with the recipe and
the sources' hashes), built in a staging folder; its model card gains the search's fitness and the
test-split scores, and only then is it renamed into place, so a failure (a full disk, say) leaves
no partial folder and loses no existing one. In the search's dtype it equals, tensor for tensor,
the candidate that was evaluated.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from evomerge.core.errors import UsageError
from evomerge.core.io import atomic_write_text, replace_folder
from evomerge.runs.export import describe, recipe_from_run
from evomerge.runs.folder import RunFolder
from evomerge.runs.source_hashes import check_sources_unchanged
from evomerge.search.config import SearchConfig
from evomerge.search.records import EvalRecord


def _card_section(run_dir: Path, rank: int, record: EvalRecord, cfg: SearchConfig, test: dict, dtype: str) -> str:
    lines = ["", "## Search", "",
             f"Found by `evomerge search` in `{run_dir}` (rank {rank}: {describe(record)}).", "",
             "| task | metric | weight | search split | search score |", "|---|---|---|---|---|"]
    for t in cfg.tasks:
        v = record.metrics.get(t.name, {}).get(t.metric)
        lines.append(f"| {t.name} | {t.metric} | {t.weight:g} | {t.split or 'default'} | "
                     f"{'-' if v is None else f'{v:.4f}'} |")
    lines += ["", f"Fitness (weighted sum): {record.fitness:.4f}.", ""]
    if test:
        lines += [f"### Test split ({dtype}, batch size {cfg.batch_size})", "", "| task | metrics |", "|---|---|"]
        lines += [f"| {task} | {', '.join(f'{k} {v:.4f}' for k, v in m.items())} |" for task, m in test.items()]
        lines.append("")
    return "\n".join(lines)


STAGING_PREFIX = ".{name}.materializing-"  # + the pid of the materialize that writes it


def remove_stale_staging(folder: Path) -> list[Path]:
    """Removes the staging folders a killed materialize left in ``folder`` (its pid is dead)."""
    removed = []
    for p in folder.glob(f"{STAGING_PREFIX.format(name='*')}*"):
        pid = p.name.rsplit("-", 1)[-1]
        if not (p.is_dir() and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        except PermissionError:  # alive, another user's
            pass
    return removed


def materialize(run_dir: str | Path, out: str | Path, *, rank: int = 1, dtype: str | None = None,
                device: str = "cpu", force: bool = False, score_test: bool = True) -> tuple[Path, dict]:
    from evomerge.evaluation.trial import test_split_metrics
    from evomerge.merge.writer import write_model
    from evomerge.models.folders import load_causal_lm, load_tokenizer

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and not force:
        raise UsageError(f"{out} exists; pass --force to replace it")
    recipe, record = recipe_from_run(run_dir, rank)
    cfg = SearchConfig.from_dict(RunFolder.open(run_dir).config_dict())
    hashes = check_sources_unchanged(run_dir, cfg, "materialize")
    dtype = dtype or getattr(recipe, "dtype", None) or cfg.dtype
    remove_stale_staging(out.parent)
    staging = out.parent / f"{STAGING_PREFIX.format(name=out.name)}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        # a parameter-space recipe through the merge writer; a layer path folded into a plain model
        write_model(recipe, staging, device=device, dtype=dtype, force=True, allow_pickle=cfg.allow_pickle,
                    known_hashes=hashes)
        test: dict[str, dict[str, float]] = {}
        if score_test:
            model = load_causal_lm(staging, device=device, dtype=dtype)
            tok = load_tokenizer(staging)
            test = test_split_metrics(model, tok, cfg.tasks, cfg.batch_size)
        card = staging / "README.md"
        atomic_write_text(card, card.read_text() + _card_section(run_dir, rank, record, cfg, test, dtype))
        replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out, {"record": record, "test": test, "recipe_hash": recipe.hash()}
