"""Builds the offline model zoo: a tokenizer, a base model and one specialist per skill.

The recipe follows the measured prototype in shared/reference/zoo-notes.md:
- the base has *partial knowledge*: true answers on a restricted input range (add with a, b < 60,
  rev/sub over letters a-p) plus a copy task over all letters, so that it knows every format and
  alphabet;
- each specialist is fine-tuned from the base on its skill's full range, answer-only loss, and is
  stopped early once a validation set (neither dev nor test) reaches ``val_target``: small task
  vectors, as real fine-tunes of one base have.

One zoo per key on every x86-64 machine: the build trains on one thread (a thread count changes
the order of float sums) with torch's and MKL's CPU kernels pinned to AVX2 (zoo/kernels.py); a
process that imported torch without the pins builds in a child process that has them. zoo.json
records the sha256 of every weights file; tests/golden/zoo_hashes.json holds the committed ones.
Elsewhere (ARM) no pin applies and the key differs: a build is deterministic on one machine type.

The build is cached: ``zoo.json`` records a key over the builder's source, the parameters and the
torch version; a second build with the same key does nothing. The folder is built under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from evomerge.core.errors import ZooError
from evomerge.core.io import atomic_write_text
from evomerge.zoo import skills as skills_mod
from evomerge.zoo.kernels import KERNEL_PINS, X86_64, pinned
from evomerge.zoo.skills import SKILLS, SPECIALIST_SKILLS, Item, sample_items
from evomerge.zoo.tokenizer import build_tokenizer
from evomerge.zoo.train import ModelShape, TrainConfig, exact_match, new_model, train

ZOO_FORMAT = 2  # 2: one training thread, pinned kernels, weights' hashes in zoo.json
PROGRESS_LINES = 10  # training progress lines per model in the log (without a terminal's bar)


@dataclass(frozen=True)
class ZooParams:
    seed: int = 0
    shape: ModelShape = field(default_factory=ModelShape)
    base_steps: int = 1500
    base_lr: float = 3e-3
    # add : rev : sub : copy in the base's corpus
    base_mix: tuple[int, int, int, int] = (3, 2, 1, 1)
    spec_lr: float = 3e-4
    spec_max_steps: int = 600
    val_items: int = 300
    val_target: float = 0.97


def _builder_sources() -> list[Path]:
    """The modules whose code decides the zoo's bytes (the cache key hashes them)."""
    here = Path(__file__).resolve().parent
    return [here / f for f in ("build.py", "kernels.py", "skills.py", "tokenizer.py", "train.py")]


def cache_key(params: ZooParams) -> str:
    h = hashlib.sha256()
    for p in _builder_sources():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(json.dumps(asdict(params), sort_keys=True).encode())
    h.update(torch.__version__.encode())
    # the pinned x86-64 kernels, or another architecture's own (whose zoo is another one)
    h.update(b"x86-64-avx2" if X86_64 else platform.machine().encode())
    return h.hexdigest()[:16]


def read_manifest(zoo_dir: str | Path) -> dict:
    path = Path(zoo_dir) / "zoo.json"
    if not path.is_file():
        raise ZooError(f"{zoo_dir} is not a zoo folder (no zoo.json); build one with `evomerge zoo --out {zoo_dir}`")
    return json.loads(path.read_text())


def _base_batch(mix: tuple[int, ...]):
    names = ("add", "rev", "sub", "copy")
    probs = np.array(mix, dtype=np.float64) / sum(mix)

    def draw(rng: np.random.Generator, n: int) -> list[Item]:
        which = rng.choice(len(names), size=n, p=probs)
        return [SKILLS[names[k]].item(rng, restricted=names[k] != "copy") for k in which]

    return draw


def _skill_batch(skill: str):
    def draw(rng: np.random.Generator, n: int) -> list[Item]:
        return [SKILLS[skill].item(rng) for _ in range(n)]

    return draw


def weight_hashes(zoo_dir: str | Path) -> dict[str, str]:
    """sha256 of every weights file of a zoo, by path relative to it."""
    root = Path(zoo_dir)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.safetensors"))}


def build_zoo(out: str | Path, params: ZooParams = ZooParams(), force: bool = False,
              log=print, progress: bool = False) -> Path:
    """Builds the zoo into ``out`` unless an identical build is already there; returns ``out``.

    ``progress`` draws a progress bar of the training steps on the terminal (the CLI's default);
    without it, ``log`` gets a few progress lines per model."""
    out = Path(out)
    key = cache_key(params)
    if (out / "zoo.json").is_file():
        try:
            existing = read_manifest(out)
        except (OSError, json.JSONDecodeError):
            existing = {}
        if existing.get("key") == key:
            log(f"zoo at {out} is up to date (key {key})")
            return out
        if not force:
            raise ZooError(f"{out} holds a zoo built with other parameters or code "
                                  f"(key {existing.get('key')} != {key}); pass --force to rebuild it")
    elif out.exists() and any(out.iterdir()) and not force:
        raise ZooError(f"{out} exists and is not a zoo folder; pass --force to replace it")

    t_start = time.perf_counter()
    prev_threads = torch.get_num_threads()
    tmp = out.parent / f".{out.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if pinned():
            torch.set_num_threads(1)
            manifest = _build_into(tmp, params, key, log, progress)
            manifest["weights_sha256"] = weight_hashes(tmp)
        else:  # torch already chose its kernels here: train in a child process that has the pins
            log("building in a child process with the CPU kernels pinned (torch was imported unpinned)")
            subprocess.run([sys.executable, "-m", "evomerge.zoo.build", str(tmp), json.dumps(asdict(params))],
                           env={**os.environ, **KERNEL_PINS}, check=True)
            manifest = read_manifest(tmp)
        manifest["build"]["seconds"] = round(time.perf_counter() - t_start, 1)
        atomic_write_text(tmp / "zoo.json", json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        torch.set_num_threads(prev_threads)
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"zoo written to {out} in {time.perf_counter() - t_start:.0f} s")
    return out


def _save(model, tok, path: Path) -> None:
    model.save_pretrained(path)
    tok.save_pretrained(path)


@contextmanager
def _steps_bar(enabled: bool, label: str, total: int, log=print):
    """A rich progress bar of training steps; when disabled, PROGRESS_LINES lines to ``log``."""
    if not enabled:
        every = max(total // PROGRESS_LINES, 1)
        t0 = time.perf_counter()

        def line(step: int) -> None:
            if step % every == 0 and step < total:
                log(f"  {label}: step {step}/{total}, {time.perf_counter() - t0:.0f} s")
        yield line
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("  " + label, BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda step: bar.update(task, completed=step)


def _build_into(tmp: Path, params: ZooParams, key: str, log, progress: bool = False) -> dict:
    tok = build_tokenizer()
    shape = params.shape
    seed = params.seed

    log(f"training base ({params.base_steps} steps, {shape.layers}x{shape.hidden} Llama)...")
    t0 = time.perf_counter()
    base = new_model(tok, shape, seed)
    with _steps_bar(progress, "base", params.base_steps, log) as on_step:
        train(base, tok, TrainConfig(steps=params.base_steps, lr=params.base_lr), shape.seq_len,
              _base_batch(params.base_mix), seed=seed + 1, on_step=on_step)
    _save(base, tok, tmp / "base")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    log(f"  base: {time.perf_counter() - t0:.0f} s")

    models = {"base": {"path": "base", "role": "base", "skills": list(SKILLS),
                       "note": "partial knowledge: restricted ranges of add/rev/sub, full copy"}}
    for i, skill in enumerate(SPECIALIST_SKILLS):
        t0 = time.perf_counter()
        model = new_model(tok, shape, seed)
        model.load_state_dict(base_state)
        # Validation items come from their own seed: neither the dev nor the test split.
        val = sample_items(skill, params.val_items, seed=10_000 + 100 * seed + i)
        accs: list[float] = []

        def stop(step: int, model=model, val=val, accs=accs) -> bool:
            accs.append(exact_match(model, tok, val, shape.seq_len))
            return accs[-1] >= params.val_target

        with _steps_bar(progress, f"spec_{skill} (at most)", params.spec_max_steps, log) as on_step:
            steps = train(model, tok, TrainConfig(steps=params.spec_max_steps, lr=params.spec_lr,
                                                  warmup=0, final_lr_frac=1.0, answer_only=True),
                          shape.seq_len, _skill_batch(skill), seed=seed + 2 + i, stop=stop,
                          on_step=on_step)
        name = f"spec_{skill}"
        _save(model, tok, tmp / name)
        models[name] = {"path": name, "role": "specialist", "skill": skill, "task": f"zoo_{skill}",
                        "steps": steps, "val_acc": accs[-1]}
        log(f"  {name}: {steps} steps, val acc {accs[-1]:.3f}, {time.perf_counter() - t0:.0f} s")

    return {
        "format": ZOO_FORMAT,
        "key": key,
        "base": "base",
        "specialists": [f"spec_{s}" for s in SPECIALIST_SKILLS],
        "models": models,
        "tasks": {s: f"zoo_{s}" for s in SPECIALIST_SKILLS},
        "skills": {s: SKILLS[s].description for s in SKILLS},
        "sub_table": "".join(skills_mod.SUB_TABLE[c] for c in skills_mod.LETTERS),
        "build": {"params": asdict(params), "torch": torch.__version__, "machine": platform.machine(),
                  "kernels": KERNEL_PINS if X86_64 else None, "threads": 1},
    }


def _child_build(tmp: str, params_json: str) -> None:
    """``python -m evomerge.zoo.build TMP PARAMS``: build_zoo's child, started with the pins."""
    raw = json.loads(params_json)
    params = ZooParams(**{**raw, "shape": ModelShape(**raw["shape"]), "base_mix": tuple(raw["base_mix"])})
    torch.set_num_threads(1)
    manifest = _build_into(Path(tmp), params, cache_key(params), lambda msg: print(msg, flush=True))
    manifest["weights_sha256"] = weight_hashes(tmp)
    atomic_write_text(Path(tmp) / "zoo.json", json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    _child_build(*sys.argv[1:3])
