"""Tiny PEFT LoRA adapters over the zoo base for the LoRA tests (no training: random factors)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def make_adapter(base_dir: Path, out: Path, seed: int, *, rank: int = 4, alpha: int = 8,
                 targets=("q_proj", "v_proj", "down_proj"), use_rslora: bool = False,
                 use_dora: bool = False) -> Path:
    """A peft adapter with random, non-zero A and B (scale 0.02), saved with save_pretrained;
    ``targets``: module names, or one of peft's strings ("all-linear")."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    targets = targets if isinstance(targets, str) else list(targets)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                     use_rslora=use_rslora, use_dora=use_dora, task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(model, cfg)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = torch.randn_like(p) * 0.02
    model.save_pretrained(str(out))
    return out


def merged_full(base_dir: Path, adapter: Path, out: Path) -> Path:
    """peft's merge_and_unload of `adapter` over the base, saved as a full folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out))
    for f in base_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def edit_config(adapter: Path, **changes) -> None:
    p = adapter / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))
