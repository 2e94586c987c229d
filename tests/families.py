"""Tiny model families of every architecture people merge, built offline from transformers' config
classes (issue #30's architecture matrix).

Each family is a base and three fine-tunes (`ft1`..`ft3`: the base plus a shared and an own
perturbation, so sign election and angles have work): 4 layers, hidden 64, two attention heads of
32 (vLLM's CPU build refuses head size 16), the zoo's character tokenizer (103 tokens, so lm-eval's
zoo tasks run on them). The weights come from seeded CPU generators, not from transformers'
initializers, so the bytes are the same on every run and in mergekit's venv
(scripts/make_family_golden.py builds them there). `llama_untied`'s ft1 is saved in shards,
`mistral` is bfloat16, `qwen2_moe` and `mixtral` are mixtures of experts.

Pure torch/transformers/safetensors (no evomerge import beyond the zoo tokenizer's module, which
imports only tokenizers/transformers), so that mergekit's venv can run it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HIDDEN, LAYERS, HEADS, HEAD_DIM, INTER = 64, 4, 2, 32, 128
MEMBERS = ("base", "ft1", "ft2", "ft3")
BOS, EOS, PAD = 1, 2, 0


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str  # transformers' config class
    kwargs: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    sharded: tuple[str, ...] = ()  # members saved in shards


def _llama_like(**kw) -> dict[str, Any]:
    return dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=1, max_position_embeddings=128, **kw)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", "LlamaConfig", _llama_like(tie_word_embeddings=True)),
    Family("llama_untied", "LlamaConfig", _llama_like(tie_word_embeddings=False), sharded=("ft1",)),
    Family("mistral", "MistralConfig", _llama_like(tie_word_embeddings=False, head_dim=HEAD_DIM),
           dtype=torch.bfloat16),
    Family("mixtral", "MixtralConfig", _llama_like(tie_word_embeddings=False, head_dim=HEAD_DIM,
                                                   num_local_experts=4, num_experts_per_tok=2)),
    Family("qwen2", "Qwen2Config", _llama_like(tie_word_embeddings=False)),
    Family("qwen3", "Qwen3Config", _llama_like(tie_word_embeddings=True, head_dim=HEAD_DIM)),
    Family("qwen2_moe", "Qwen2MoeConfig", _llama_like(
        tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
        shared_expert_intermediate_size=64)),
    Family("gemma", "GemmaConfig", _llama_like(head_dim=HEAD_DIM)),
    Family("gemma2", "Gemma2Config", _llama_like(head_dim=HEAD_DIM, sliding_window=16)),
    Family("gemma3_text", "Gemma3TextConfig", _llama_like(head_dim=HEAD_DIM, sliding_window=16)),
    Family("phi", "PhiConfig", dict(hidden_size=HIDDEN, intermediate_size=INTER,
                                    num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                    max_position_embeddings=128)),
    Family("phi3", "Phi3Config", _llama_like(tie_word_embeddings=False)),
    Family("olmo2", "Olmo2Config", _llama_like(tie_word_embeddings=False)),
    Family("granite", "GraniteConfig", _llama_like(tie_word_embeddings=True, residual_multiplier=0.5,
                                                   embedding_multiplier=2.0, logits_scaling=2.0)),
    Family("stablelm", "StableLmConfig", _llama_like(tie_word_embeddings=False)),
    Family("starcoder2", "Starcoder2Config", _llama_like(tie_word_embeddings=True)),
    Family("gpt2", "GPT2Config", dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=128)),
    Family("gpt_neox", "GPTNeoXConfig", dict(hidden_size=HIDDEN, intermediate_size=INTER,
                                             num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                             max_position_embeddings=128,
                                             tie_word_embeddings=False)),
    Family("falcon", "FalconConfig", dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                          num_attention_heads=HEADS, alibi=False,
                                          new_decoder_architecture=False, multi_query=True)),
)}


def make_config(family: Family, vocab: int):
    import transformers

    cls = getattr(transformers, family.config_class)
    cfg = cls(vocab_size=vocab, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
              **family.kwargs)
    cfg.dtype = family.dtype
    return cfg


def _base_value(name: str, shape: torch.Size, g: torch.Generator) -> torch.Tensor:
    v = torch.randn(shape, generator=g) * 0.05
    if any(e in name for e in ("embed_tokens", "wte", "embed_in", "word_embeddings")):
        v = v * 20  # a residual stream of rms 1, as trained models carry (norms' epsilon small)
    if len(shape) == 1 and name.endswith("weight") and ("norm" in name or "ln_" in name):
        v = v + 1.0  # norm scales near one
    return v


def build_family(family: Family, out: Path) -> dict[str, Path]:
    """Writes the family's members under `out`; returns member -> folder."""
    from transformers import AutoModelForCausalLM

    from evomerge.zoo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cfg = make_config(family, len(tok))
    seed = int(hashlib.sha256(family.name.encode()).hexdigest()[:8], 16)
    torch.manual_seed(seed)  # transformers' initializers (overwritten below) draw from it
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    base = {k: _base_value(k, v.shape, g) if v.is_floating_point() else v.clone()
            for k, v in sorted(model.state_dict().items())}
    paths = {}
    for member in MEMBERS:
        state = dict(base)
        if member != "base":
            i = int(member[2:])
            shared = torch.Generator().manual_seed(seed + 100)
            own = torch.Generator().manual_seed(seed + 100 + i)
            state = {k: v + 0.01 * i * (0.6 * torch.randn(v.shape, generator=shared)
                                        + torch.randn(v.shape, generator=own))
                     if v.is_floating_point() else v for k, v in base.items()}
        # the model's tensors now, not the first member's: a save in another dtype (`.to`)
        # replaced them, and copying into the old ones left every bfloat16 member equal to the base
        params = dict(model.state_dict())
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)  # tied tensors get the last of their names' values
        folder = out / member
        shard = {"max_shard_size": "40KB"} if member in family.sharded else {}
        model.to(family.dtype).save_pretrained(folder, **shard)  # checkpoint names, ties dropped
        model.to(torch.float32)
        tok.save_pretrained(folder)
        paths[member] = folder
    return paths


def cache_key() -> str:
    import transformers

    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(f"{torch.__version__} {transformers.__version__}".encode())
    return h.hexdigest()[:16]


def build_all(out: Path, names=None) -> dict[str, dict[str, Path]]:
    """Every family (or `names`) under out/<family>/<member>, built once (a `done` stamp)."""
    result = {}
    for name in names or FAMILIES:
        folder = out / name
        if not (folder / "done").is_file():
            build_family(FAMILIES[name], folder)
            (folder / "done").write_text(json.dumps(sorted(MEMBERS)))
        result[name] = {m: folder / m for m in MEMBERS}
    return result


def peft_adapter(base: Path, out: Path, targets) -> Path:
    """A peft LoRA adapter over `base` (rank 4, random non-zero factors), saved by peft."""
    from lora_helpers import make_adapter  # tests only: this module also runs in mergekit's venv

    return make_adapter(base, out, seed=3, targets=targets)


def cached_families() -> dict[str, dict[str, Path]]:
    """Every family, built once into the shared test cache ($EVOMERGE_CACHE/families/<key>, under
    a lock so that two test runs do not build it at once); about 20 s on 2 cores."""
    import fcntl
    import os

    root = Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge"))
    out = root / "families" / cache_key()
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return build_all(out)


if __name__ == "__main__":  # python tests/families.py OUT [FAMILY...]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    importlib.import_module("evomerge.zoo.tokenizer")
    build_all(Path(sys.argv[1]), sys.argv[2:] or None)
