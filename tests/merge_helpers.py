"""Tiny randomly initialized HF model folders for the merge tests (built in milliseconds)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def tiny_config(arch: str = "llama", *, layers: int = 2, hidden: int = 16, vocab: int = 103,
                tied: bool = False):
    import transformers as tf

    common = dict(vocab_size=vocab, tie_word_embeddings=tied)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=layers, num_attention_heads=2,
                              num_key_value_heads=2, max_position_embeddings=32, **common)
    if arch == "mistral":
        return tf.MistralConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=layers, num_attention_heads=2,
                                num_key_value_heads=1, max_position_embeddings=32, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=layers, num_attention_heads=2,
                              num_key_value_heads=2, max_position_embeddings=32, **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=2, n_positions=32, **common)
    raise ValueError(arch)


def save_model(path: Path, config, *, seed: int = 0, base_state: dict | None = None,
               noise: float = 0.05, tokenizer=None, shard_size: str | None = None) -> Path:
    """A model folder; with base_state, the weights are base + seeded noise (a 'fine-tune')."""
    from transformers import AutoModelForCausalLM

    from evomerge.zoo.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if base_state is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(base_state[k] + noise * torch.randn(v.shape, generator=g))
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kwargs)
    (tokenizer or build_tokenizer()).save_pretrained(path)
    return Path(path)


def model_family(root: Path, arch: str = "llama", n: int = 2, **config_kwargs) -> list[Path]:
    """A base and n fine-tunes of it, all of one architecture; returns [base, ft1, ...]."""
    from safetensors.torch import load_file

    config = tiny_config(arch, **config_kwargs)
    base = save_model(root / f"{arch}_base", config, seed=0)
    state = {}
    for f in base.glob("*.safetensors"):
        state.update(load_file(f))
    if config.tie_word_embeddings and "lm_head.weight" not in state:
        emb = next(k for k in state if "embed_tokens" in k or "wte" in k)
        state["lm_head.weight"] = state[emb]
    out = [base]
    for i in range(1, n + 1):
        out.append(save_model(root / f"{arch}_ft{i}", config, seed=i, base_state=state))
    return out


def load_folder(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(f))
    return state
