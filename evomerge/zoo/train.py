"""Training and fast scoring for the zoo's tiny Llama models (CPU, deterministic for a seed).

Sequences are ``prompt + answer + EOS``, right-padded to ``seq_len``; no BOS, because lm-eval's HF
backend adds none for a causal LM by default and the zoo must score the same way it was trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge.zoo.skills import Item


@dataclass(frozen=True)
class ModelShape:
    layers: int = 4
    hidden: int = 128
    intermediate: int = 256
    heads: int = 4
    seq_len: int = 16


def new_model(tok: PreTrainedTokenizerFast, shape: ModelShape, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=4 * shape.seq_len,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )
    # Weight init draws from torch's global generator: fork it so the caller's stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def encode(tok: PreTrainedTokenizerFast, items: list[Item], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, L] (right-padded) and the number of prompt tokens per row."""
    ids = torch.full((len(items), seq_len), tok.pad_token_id, dtype=torch.long)
    n_prompt = torch.empty(len(items), dtype=torch.long)
    for r, it in enumerate(items):
        p = tok.encode(it.prompt, add_special_tokens=False)
        a = tok.encode(it.answer, add_special_tokens=False) + [tok.eos_token_id]
        row = p + a
        if len(row) > seq_len:
            raise ValueError(f"item {it} is longer than seq_len={seq_len}")
        ids[r, : len(row)] = torch.tensor(row)
        n_prompt[r] = len(p)
    return ids, n_prompt


def _target_mask(ids: torch.Tensor, n_prompt: torch.Tensor, pad_id: int, answer_only: bool) -> torch.Tensor:
    """Mask over next-token targets ids[:, 1:]: answer tokens (+EOS), or every non-pad token."""
    pos = torch.arange(1, ids.shape[1]).unsqueeze(0)
    mask = ids[:, 1:] != pad_id
    if answer_only:
        mask &= pos >= n_prompt.unsqueeze(1)
    return mask


@torch.no_grad()
def exact_match(model: torch.nn.Module, tok: PreTrainedTokenizerFast, items: list[Item], seq_len: int,
                batch_size: int = 256) -> float:
    """Teacher-forced exact match over answer + EOS (equals greedy decoding; lm-eval's ``acc``)."""
    model.eval()
    correct = 0
    for i in range(0, len(items), batch_size):
        ids, n_prompt = encode(tok, items[i : i + batch_size], seq_len)
        logits = model(input_ids=ids).logits[:, :-1]
        mask = _target_mask(ids, n_prompt, tok.pad_token_id, answer_only=True)
        hit = (logits.argmax(-1) == ids[:, 1:]) | ~mask
        correct += int(hit.all(dim=1).sum())
    return correct / len(items)


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float
    batch: int = 64
    warmup: int = 50
    final_lr_frac: float = 0.1
    weight_decay: float = 0.01
    clip: float = 1.0
    answer_only: bool = False
    eval_every: int = 25


def train(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, cfg: TrainConfig, seq_len: int,
          draw_batch: Callable[[np.random.Generator, int], list[Item]], seed: int,
          stop: Callable[[int], bool] | None = None,
          on_step: Callable[[int], None] | None = None) -> int:
    """AdamW with warm-up and cosine decay. ``stop(step)`` is asked every ``eval_every`` steps
    (early stopping); ``on_step(step)`` after each step (progress); returns the number of steps
    taken."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (cfg.final_lr_frac + (1 - cfg.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))

    for step in range(cfg.steps):
        if stop is not None and step % cfg.eval_every == 0 and step > 0 and stop(step):
            return step
        model.train()
        ids, n_prompt = encode(tok, draw_batch(rng, cfg.batch), seq_len)
        logits = model(input_ids=ids).logits[:, :-1]
        mask = _target_mask(ids, n_prompt, tok.pad_token_id, cfg.answer_only)
        loss = F.cross_entropy(logits[mask], ids[:, 1:][mask])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        if on_step is not None:
            on_step(step + 1)
    if stop is not None:
        stop(cfg.steps)
    return cfg.steps
