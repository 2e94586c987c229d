"""The model card (README.md) of a merged folder: recipe, source hashes, library versions.

Nothing time- or host-dependent goes in, so merging the same recipe twice gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from threading import Event
from typing import TYPE_CHECKING

from evomerge.methods.registry import uses_random_masks
from evomerge.models.fingerprint import meaning_files, sha256_file

if TYPE_CHECKING:
    from evomerge.merge.plan import MergePlan




def library_versions() -> dict[str, str]:
    out = {}
    for dist in ("evomerge", "torch", "transformers", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    if out["evomerge"] == "not installed":
        from evomerge.core.version import __version__

        out["evomerge"] = __version__
    return out


def source_hashes(plan: MergePlan, stop: Event | None = None,
                  known: Mapping[Path, str] | None = None) -> dict[Path, str]:
    """sha256 of every source's meaning files (the card's table: weights, config, tokenizer,
    adapter_config.json), each file hashed once; cut short (empty hashes) once `stop` is set.
    `known`: hashes this process computed already (a materialize's check against the run's
    sources.json), taken as they are; any other file is hashed."""
    known = known or {}
    files = dict.fromkeys(f for source in plan.sources.values() for f in meaning_files(source))
    return {f: known[f] if f in known else sha256_file(f, stop) for f in files}


def model_card(plan: MergePlan, hashes: Mapping[Path, str] | None = None) -> str:
    """The card; `hashes` (source_hashes, computed beside the merge) or else hashed here."""
    hashes = hashes if hashes is not None else source_hashes(plan)
    recipe = plan.recipe
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- merge",
        "- evomerge",
        "---",
        "",
        "# Merged model",
        "",
        f"Merged by evomerge with the `{recipe.merge_method}` method "
        "(mergekit 0.1.5 semantics).",
        "",
        f"## Recipe (sha256 `{recipe.hash()}`)",
        "",
        "```yaml",
        recipe.to_yaml().rstrip(),
        "```",
        "",
    ]
    if uses_random_masks(plan.method):
        lines += [
            f"Random masks (DARE/DELLA) come from uniforms keyed by `mask_seed` "
            f"({recipe.mask_seed}) and the tensor name: `evomerge merge` rebuilds this model "
            "bit for bit, while mergekit draws masks from torch's global generator and "
            "reproduces it only in distribution.",
            "",
        ]
    # the weights and every file that changes what they mean (config, tokenizer, adapter_config.json)
    lines += ["## Source files (sha256)", "", "| model | file | sha256 |", "|---|---|---|"]
    for name, source in plan.sources.items():
        for file in meaning_files(source):
            lines.append(f"| {name} | {file.name} | `{hashes[file]}` |")
    lines += ["", "## Libraries", ""]
    lines += [f"- {k} {v}" for k, v in library_versions().items()]
    return "\n".join(lines) + "\n"
