"""Compare `evomerge merge` with mergekit 0.1.5 on tiny random Llama folders (float32).

mergekit is not a dependency of evomerge: install it in a separate venv, e.g.
    python3 -m venv /work/mkvenv
    /work/mkvenv/bin/pip install -c constraints.txt mergekit==0.1.5
and run
    python scripts/compare_mergekit.py --mergekit-venv /work/mkvenv
It builds a base and three fine-tune-like variants (plus one with an extra token), merges each
recipe below with both tools and prints the largest absolute difference per method (last line: a
table). DARE/DELLA are left out: mergekit draws their masks from torch's global generator.

    python scripts/compare_mergekit.py --mergekit-venv /work/mkvenv --recipe exported.yaml ...

compares the given mergekit YAML recipes instead (e.g. a search's exported winner), over the
models they name. The test suite's parity check needs no mergekit: it compares with golden files
(tests/golden, scripts/make_mergekit_golden.py, docs/parity.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from evomerge.merge.engine import merge_state_dict  # noqa: E402
from evomerge.recipes.parameter_space import Recipe  # noqa: E402

RECIPES: dict[str, str] = {
    "linear (gradient + filter)": """
merge_method: linear
models:
  - model: {base}
    parameters: {{weight: [0.2, 1.0, 0.5]}}
  - model: {a}
    parameters:
      weight: [{{filter: mlp, value: [1.0, 0.1]}}, {{value: 0.7}}]
  - model: {b}
    parameters: {{weight: 0.4}}
dtype: float32
""",
    "task_arithmetic (gradient + filter + lambda)": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters:
      weight: [{{filter: self_attn, value: [0.3, 0.9]}}, {{filter: "*", value: 0.5}}]
  - model: {b}
    parameters: {{weight: [1.0, -0.2, 0.6]}}
  - model: {c}
parameters: {{weight: 0.25, lambda: 0.8}}
dtype: float32
""",
    "ties (density gradient + filters)": """
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 1.0, density: [0.2, 0.9]}}
  - model: {b}
    parameters:
      weight: [{{filter: norm, value: 0.3}}, {{value: [0.5, 1.5]}}]
      density: 0.5
  - model: {c}
    parameters: {{weight: 0.7, density: [{{filter: mlp, value: 0.1}}, {{value: 0.6}}]}}
dtype: float32
""",
    "ties (slices, slice parameters, normalize false)": """
merge_method: ties
base_model: {base}
slices:
  - sources:
      - model: {base}
        layer_range: [0, 3]
      - model: {a}
        layer_range: [0, 3]
        parameters: {{weight: [0.3, 0.9], density: 0.4}}
      - model: {b}
        layer_range: [0, 3]
    parameters: {{weight: 0.5, density: 0.8}}
  - sources:
      - model: {base}
        layer_range: [3, 6]
      - model: {a}
        layer_range: [3, 6]
      - model: {b}
        layer_range: [3, 6]
        parameters: {{density: [0.9, 0.1]}}
    parameters: {{weight: [1.0, 0.2], density: 0.5, normalize: false}}
dtype: float32
""",
    "breadcrumbs (gamma, density)": """
merge_method: breadcrumbs
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 1.0, density: 0.7, gamma: 0.05}}
  - model: {b}
    parameters: {{weight: [0.5, 1.0], density: [0.3, 0.9]}}
dtype: float32
""",
    "breadcrumbs_ties (filters)": """
merge_method: breadcrumbs_ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 1.0, density: 0.6, gamma: [{{filter: mlp, value: 0.1}}, {{value: 0.02}}]}}
  - model: {b}
    parameters: {{weight: 0.8, density: 0.5}}
  - model: {c}
    parameters: {{weight: [0.2, 0.6], density: 0.9}}
parameters: {{normalize: true}}
dtype: float32
""",
    "task_arithmetic (tokenizer_source: model with an extra token)": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {extra}
    parameters: {{weight: 0.5}}
tokenizer_source: {extra}
dtype: float32
""",
}


def build_models(root: Path) -> dict[str, str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.zoo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    paths = {}
    for i, name in enumerate(("base", "a", "b", "c")):
        model = LlamaForCausalLM(cfg)
        state = {k: v.clone() for k, v in base.state_dict().items()}
        if i:
            g = torch.Generator().manual_seed(i)
            # Sparse-ish fine-tune deltas of varied scale, so trimming and signs matter.
            for k, v in state.items():
                noise = torch.randn(v.shape, generator=g) * 0.02 * i
                keep = torch.rand(v.shape, generator=g) < 0.7
                state[k] = v + noise * keep
        model.load_state_dict(state)
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    # A variant whose tokenizer has one more token (its embedding rows are new).
    tok_x = build_tokenizer()
    tok_x.add_tokens(["<|extra|>"], special_tokens=True)
    cfg_x = LlamaConfig(**{**cfg.to_dict(), "vocab_size": len(tok_x)})
    extra = LlamaForCausalLM(cfg_x)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(9)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        state[k] = torch.cat([state[k], torch.randn(1, 64, generator=g)])
    for k, v in state.items():
        state[k] = v + torch.randn(v.shape, generator=g) * 0.01
    extra.load_state_dict(state)
    paths["extra"] = str(root / "extra")
    extra.save_pretrained(paths["extra"])
    tok_x.save_pretrained(paths["extra"])
    return paths


def run_mergekit(venv: Path, config: Path, out: Path) -> dict[str, torch.Tensor]:
    cmd = [str(venv / "bin" / "mergekit-yaml"), str(config), str(out), "--copy-tokenizer",
           "--quiet", "--no-cuda"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-venv", type=Path, required=True)
    ap.add_argument("--keep", type=Path, default=None, help="work here instead of a temp dir")
    ap.add_argument("--recipe", type=Path, action="append", default=[],
                    help="compare this mergekit YAML recipe (repeatable) instead of the built-in")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="evomerge-vs-mergekit-"))
    root.mkdir(parents=True, exist_ok=True)
    if args.recipe:
        recipes = {str(p): p.read_text() for p in args.recipe}
    else:
        paths = build_models(root / "models")
        recipes = {label: template.format(**paths) for label, template in RECIPES.items()}
    rows = []
    for i, (label, text) in enumerate(recipes.items()):
        cfg = root / f"recipe{i}.yml"
        cfg.write_text(text)
        t0 = time.perf_counter()
        ref = run_mergekit(args.mergekit_venv, cfg, root / f"mergekit{i}")
        ours = merge_state_dict(Recipe.from_yaml(text))
        if set(ref) != set(ours):
            print(f"{label}: tensor names differ: {sorted(set(ref) ^ set(ours))[:5]}")
            rows.append((label, float("nan"), 0))
            continue
        diff = max((ref[k].float() - ours[k].float()).abs().max().item() for k in ref)
        n_exact = sum(torch.equal(ref[k], ours[k]) for k in ref)
        rows.append((label, diff, n_exact, len(ref)))
        print(f"{label}: max |diff| = {diff:.3g} ({n_exact}/{len(ref)} tensors bit-identical, "
              f"{time.perf_counter() - t0:.1f}s)", flush=True)
    print("\n| recipe | max abs diff | bit-identical tensors |\n|---|---|---|")
    for label, diff, n_exact, *n in rows:
        print(f"| {label} | {diff:.3g} | {n_exact}/{n[0] if n else '?'} |")
    return 0 if all(r[1] <= 1e-6 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
