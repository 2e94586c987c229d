"""The mergekit parity goldens' format, shared by their generator and the parity tests.

Pure torch/yaml/safetensors (no evomerge, no mergekit), so that scripts/make_mergekit_golden.py
can import it in mergekit's own virtual environment.

tests/golden/
  family/             the fixture models (scripts/make_parity_family.py)
  recipes.yaml        name -> {kind, recipe}; "@family/NAME" stands for family/NAME
  manifest.json       per recipe: method, kind, every output tensor's sha256 (of its bytes, and
                      of its bytes with -0.0 as +0.0)/dtype/shape, the
                      names of the sample tensors stored, and (kind distribution) mask stats
  <recipe>.safetensors  the sample tensors of mergekit's output (a few per recipe)
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
import yaml

GOLDEN = Path(__file__).resolve().parent / "golden"
FAMILY = GOLDEN / "family"
PLACEHOLDER = "@family/"
# stored in full for each recipe (when present): a quantized (tied) MLP tensor, a continuous
# attention tensor, a norm and the output embedding (tokenizer_source rows)
SAMPLES = ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight",
           "model.layers.1.post_attention_layernorm.weight", "lm_head.weight")
# distribution stats are taken over tensors with at least this many non-zero delta elements
MIN_STAT_ELEMENTS = 256


def load_recipes() -> dict[str, dict[str, Any]]:
    return yaml.safe_load((GOLDEN / "recipes.yaml").read_text())


def resolve(recipe: dict[str, Any], family: Path = FAMILY) -> dict[str, Any]:
    """The recipe with every "@family/NAME" string replaced by the folder's absolute path."""

    def walk(x: Any) -> Any:
        if isinstance(x, str) and x.startswith(PLACEHOLDER):
            return str(family / x[len(PLACEHOLDER):])
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(copy.deepcopy(recipe))


def base_and_source(recipe: dict[str, Any]) -> tuple[str, str]:
    """The base and the single fine-tune of a distribution recipe (as "@family/NAME")."""
    (model,) = recipe["models"]
    return recipe["base_model"], model["model"]


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                          ).hexdigest()


def equal_sha256(t: torch.Tensor) -> str:
    """sha256 with -0.0 written as +0.0: equal for tensors that torch.equal calls equal."""
    if t.is_floating_point():
        t = torch.where(t == 0, torch.zeros_like(t), t)
    return tensor_sha256(t)


def describe(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """sha256: the bytes; sha256_eq: the bytes up to the sign of zeros (torch.equal)."""
    return {k: {"sha256": tensor_sha256(v), "sha256_eq": equal_sha256(v),
                "dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
            for k, v in sorted(tensors.items())}


def load_manifest() -> dict[str, Any]:
    return json.loads((GOLDEN / "manifest.json").read_text())


def mask_stats(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
               source: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per tensor of a one-source dare/della merge: what its random mask did.

    kept: the share of the non-zero delta elements (source - base) whose merged value moved off
    the base; rescale: the median of (merged - base) / delta over them (the L1 rescale factor);
    kept_high / kept_low: the kept share among the elements whose |delta| is above / not above
    its row's median (della keeps large magnitudes more often); n: non-zero delta elements.
    """
    out = {}
    for name, m in merged.items():
        if name not in base or not m.is_floating_point() or m.shape != base[name].shape:
            continue
        b, s = base[name].double(), source[name].double()
        d = s - b
        nz = d != 0
        n = int(nz.sum())
        if n < MIN_STAT_ELEMENTS:
            continue
        moved = (m.double() != b) & nz
        ratio = ((m.double() - b)[moved] / d[moved])
        rows = d.abs().reshape(d.shape[0], -1) if d.dim() > 1 else d.abs().reshape(1, -1)
        high = (rows > rows.median(dim=1, keepdim=True).values).reshape(d.shape) & nz
        low = nz & ~high
        out[name] = {
            "n": n, "kept": float(moved.sum()) / n,
            "rescale": float(ratio.median()) if ratio.numel() else math.nan,
            "kept_high": float((moved & high).sum()) / max(1, int(high.sum())),
            "kept_low": float((moved & low).sum()) / max(1, int(low.sum())),
        }
    return out


def load_folder(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(f))
    return state
