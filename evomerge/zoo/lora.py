"""The zoo's LoRA specialists: one rank-8 PEFT adapter per skill, trained from the zoo base.

They live in ``<zoo>/lora/lora_<skill>/`` (``adapter_config.json`` + ``adapter_model.safetensors``)
beside ``lora.json``, whose key hashes this module, its parameters, the zoo's own key and the torch
and peft versions, so a change here rebuilds only the adapters, never the zoo. Training reuses the
zoo's trainer (answer-only loss, early stop on a validation set that is neither dev nor test);
LoRA dropout is 0 and the factors' initialization draws from a forked, seeded generator, so the
bytes are the same for a seed and thread count. Each adapter records the base fingerprint
(models/adapters.py), so it is refused over any other base.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from evomerge.core.errors import ZooError
from evomerge.core.io import atomic_write_text
from evomerge.zoo.build import read_manifest
from evomerge.zoo.cached import build_cached
from evomerge.zoo.skills import SKILLS, SPECIALIST_SKILLS, Item, sample_items

LORA_DIR = "lora"
LORA_FORMAT = 1
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraZooParams:
    seed: int = 0
    threads: int = 1
    rank: int = 8
    alpha: int = 16
    lr: float = 5e-3
    max_steps: int = 200
    # a share of each batch replays the base's own corpus (restricted ranges of every skill): an
    # adapter that forgets the other skills leaves nothing for a merge to combine
    replay: float = 0.25
    batch: int = 64
    val_items: int = 300
    val_target: float = 0.9
    target_modules: tuple[str, ...] = TARGETS


def lora_cache_key(zoo_dir: str | Path, params: LoraZooParams) -> str:
    import peft

    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(json.dumps(asdict(params), sort_keys=True).encode())
    h.update(str(read_manifest(zoo_dir)["key"]).encode())
    h.update(f"{torch.__version__} {peft.__version__}".encode())
    return h.hexdigest()[:16]


def lora_paths(zoo_dir: str | Path) -> dict[str, Path]:
    """skill -> adapter folder of a built LoRA zoo."""
    root = Path(zoo_dir) / LORA_DIR
    return {s: root / f"lora_{s}" for s in SPECIALIST_SKILLS}


def read_lora_manifest(zoo_dir: str | Path) -> dict:
    path = Path(zoo_dir) / LORA_DIR / "lora.json"
    if not path.is_file():
        raise ZooError(f"{zoo_dir} has no LoRA specialists; build them with "
                       f"`evomerge zoo --out {zoo_dir} --lora`")
    return json.loads(path.read_text())


def build_lora_zoo(zoo_dir: str | Path, params: LoraZooParams = LoraZooParams(),
                   log=print) -> Path:
    """Trains the LoRA specialists into ``<zoo_dir>/lora`` unless an identical build is there."""
    zoo_dir = Path(zoo_dir)
    key = lora_cache_key(zoo_dir, params)

    def build(tmp: Path) -> dict:
        adapters = {f"lora_{skill}": _train_one(zoo_dir, tmp / f"lora_{skill}", skill, i, params, log)
                    for i, skill in enumerate(SPECIALIST_SKILLS)}
        return {"format": LORA_FORMAT, "zoo_key": read_manifest(zoo_dir)["key"],
                "adapters": adapters, "params": asdict(params)}

    return build_cached(zoo_dir / LORA_DIR, "lora.json", key, params.threads, "LoRA specialists",
                        build, log)


def _train_one(zoo_dir: Path, out: Path, skill: str, i: int, params: LoraZooParams,
               log) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.zoo.train import TrainConfig, exact_match, train

    t0 = time.perf_counter()
    manifest = read_manifest(zoo_dir)
    base_dir = zoo_dir / manifest["base"]
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    seq_len = manifest["build"]["params"]["shape"]["seq_len"]
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(r=params.rank, lora_alpha=params.alpha, lora_dropout=0.0,
                        target_modules=list(params.target_modules), bias="none",
                        task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):  # lora_A's init draws from the global generator
        torch.manual_seed(params.seed + 100 + i)
        model = get_peft_model(model, config)
    val = sample_items(skill, params.val_items, seed=20_000 + 100 * params.seed + i)
    accs: list[float] = []

    def stop(step: int) -> bool:
        accs.append(exact_match(model, tok, val, seq_len))
        return accs[-1] >= params.val_target

    others = [s for s in SKILLS if s != skill]

    def draw(rng: np.random.Generator, n: int) -> list[Item]:
        n_replay = int(round(params.replay * n))
        items = [SKILLS[skill].item(rng) for _ in range(n - n_replay)]
        for _ in range(n_replay):
            other = others[int(rng.integers(len(others)))]
            items.append(SKILLS[other].item(rng, restricted=other != "copy"))
        return items

    steps = train(model, tok, TrainConfig(steps=params.max_steps, lr=params.lr, batch=params.batch,
                                          warmup=10, final_lr_frac=1.0, answer_only=True),
                  seq_len, draw, seed=params.seed + 200 + i, stop=stop)
    model.save_pretrained(str(out))
    _finish_folder(out, base_dir)
    log(f"  lora_{skill}: {steps} steps, val acc {accs[-1]:.3f}, "
        f"{time.perf_counter() - t0:.0f} s")
    return {"path": f"{LORA_DIR}/lora_{skill}", "skill": skill, "task": f"zoo_{skill}",
            "rank": params.rank, "steps": steps, "val_acc": accs[-1]}


def _finish_folder(out: Path, base_dir: Path) -> None:
    """The base recorded relative to the adapter (the zoo folder moves), and its fingerprint."""
    from safetensors.torch import load_file, save_file

    from evomerge.models.adapters import (
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        FINGERPRINT_KEY,
        base_fingerprint,
        read_adapter,
    )
    from evomerge.models.sources import load_source

    cfg_file = out / ADAPTER_CONFIG
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = "../../" + base_dir.name
    atomic_write_text(cfg_file, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    base = load_source(str(base_dir))
    info = read_adapter(out, base)
    tensors = load_file(str(out / ADAPTER_WEIGHTS))
    save_file(tensors, str(out / ADAPTER_WEIGHTS),
              metadata={"format": "pt", FINGERPRINT_KEY: base_fingerprint(base, list(info.modules))})
