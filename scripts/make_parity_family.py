"""Write the tiny model family of the mergekit parity goldens (tests/golden/family/).

    python scripts/make_parity_family.py [--out tests/golden/family]

A base and three fine-tunes of a 2-layer Llama (hidden 32, GQA with one key/value head, the zoo's
character tokenizer of 103 tokens), plus `extra`: a fine-tune whose tokenizer has one more token
(for `tokenizer_source`). float32, about 100 kB per model. Deterministic: the same bytes on every
run (seeded generators, sorted safetensors keys, no timestamps).

The deltas are built so that sparsifiers meet exact ties of |delta| at their density cuts:
- the MLP, embedding, lm_head and norm deltas are quantized, q * 2**-9 with q in -3..3 (about a
  third zero), on a base gridded to 2**-12, so x - base is exact in float32 and |delta| takes
  four values: every density cut falls inside a run of equal magnitudes;
- the attention deltas are continuous (Gaussian), so ordinary rounding is exercised too.
Each fine-tune's delta is a shared component plus its own, so TIES' sign election has work.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

FAMILY = ("base", "ft1", "ft2", "ft3", "extra")
EXTRA_TOKEN = "<|extra|>"
QUANTUM = 2.0**-9  # quantized deltas: multiples of this
BASE_GRID = 2.0**-12  # base weights: multiples of this


def config(vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                       max_position_embeddings=64, tie_word_embeddings=False,
                       architectures=["LlamaForCausalLM"], dtype="float32")


def shapes(cfg) -> dict[str, tuple[int, ...]]:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def quantized(name: str) -> bool:
    return "self_attn" not in name


def base_state(sh: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, s in sh.items():
        if k.endswith("norm.weight"):
            v = 1 + torch.randn(s, generator=g) * 0.05
        else:
            v = torch.randn(s, generator=g) * 0.05
        out[k] = torch.round(v / BASE_GRID) * BASE_GRID
    return out


def delta(name: str, shape: tuple[int, ...], shared: torch.Generator,
          own: torch.Generator, scale: float) -> torch.Tensor:
    common = torch.randn(shape, generator=shared)
    mine = torch.randn(shape, generator=own)
    if not quantized(name):
        return (0.6 * common + mine) * 0.01 * scale
    q = torch.round((0.6 * common + mine) * 1.4).clamp(-3, 3)  # about a third rounds to 0
    return q * QUANTUM


def write(folder: Path, state: dict[str, torch.Tensor], vocab: int, tokenizer) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config(vocab).save_pretrained(folder)
    tensors = {k: state[k].contiguous() for k in sorted(state)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def build(out: Path) -> dict[str, Path]:
    from evomerge.zoo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    vocab = len(tok)
    sh = shapes(config(vocab))
    base = base_state(sh)
    paths = {"base": out / "base"}
    write(paths["base"], base, vocab, tok)
    for i in (1, 2, 3):
        shared = torch.Generator().manual_seed(100)
        own = torch.Generator().manual_seed(100 + i)
        state = {k: base[k] + delta(k, v.shape, shared, own, scale=i) for k, v in base.items()}
        paths[f"ft{i}"] = out / f"ft{i}"
        write(paths[f"ft{i}"], state, vocab, tok)
    # extra: one more token; its embedding and lm_head rows are new, the rest a fine-tune
    tok_x = build_tokenizer()
    tok_x.add_tokens([EXTRA_TOKEN], special_tokens=True)
    g = torch.Generator().manual_seed(9)
    state = {}
    for k, v in base.items():
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            v = torch.cat([v, torch.round(torch.randn(1, v.shape[1], generator=g) * 0.05
                                          / BASE_GRID) * BASE_GRID])
        state[k] = v + torch.round(torch.randn(v.shape, generator=g) * 2) * QUANTUM
    paths["extra"] = out / "extra"
    write(paths["extra"], state, len(tok_x), tok_x)
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parent.parent / "tests/golden/family")
    args = ap.parse_args()
    paths = build(args.out)
    total = sum(f.stat().st_size for p in paths.values() for f in p.iterdir())
    print(f"wrote {', '.join(paths)} under {args.out} ({total / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
