"""The zoo's block-expanded specialists: the case where layer order is the merge's lever.

Each specialist is the zoo base with ``n_blocks`` new decoder blocks inserted at ``at`` (LLaMA
Pro's block expansion, Wu et al. 2024: each new block a copy of the block before it with zeroed
output projections, so the expanded model starts out as the base), and only those blocks are
trained, on the skill's full range (answer-only loss). A share of each batch replays the base's
corpus, and on those rows the blocks are also held near the identity: a penalty on the change
they make to the hidden state, relative to its size. So a specialist's blocks add its skill and
pass everything else through.

Three such specialists share every layer but the new ones. A parameter-space merge has to fit
three skills into one set of blocks (their weights interfere); a layer path can run the three sets
one after another (docs/dataflow.md, "The block-expansion case"). ``<zoo>/blocks/`` holds
``base`` (the expanded base, blocks at the identity: the common ancestor that task vectors are
taken from), ``spec_add``, ``spec_rev``, ``spec_sub`` and ``blocks.json``, whose key hashes this
module, its parameters, the zoo's key and the torch version, so a change here rebuilds only these.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from evomerge.core.errors import ZooError
from evomerge.zoo.build import _base_batch, read_manifest
from evomerge.zoo.cached import build_cached
from evomerge.zoo.skills import SKILLS, SPECIALIST_SKILLS, sample_items
from evomerge.zoo.train import _target_mask, encode, exact_match

BLOCKS_DIR = "blocks"
BLOCKS_FORMAT = 1


@dataclass(frozen=True)
class BlockZooParams:
    seed: int = 0
    threads: int = 2
    at: int = 3  # the new blocks sit at layer indices at .. at + n_blocks - 1 (before the last base layer)
    n_blocks: int = 2
    lr: float = 3e-3
    max_steps: int = 600
    batch: int = 64
    replay: float = 0.25  # expected share of each batch drawn from the base's corpus
    identity: float = 1.0  # weight of the blocks' relative hidden-state change on replay rows
    base_mix: tuple[int, int, int, int] = (3, 2, 1, 1)  # the base's corpus (zoo/build.py)
    val_items: int = 300
    val_target: float = 0.97
    eval_every: int = 50


def blocks_cache_key(zoo_dir: str | Path, params: BlockZooParams) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(json.dumps(asdict(params), sort_keys=True).encode())
    h.update(str(read_manifest(zoo_dir)["key"]).encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


def blocks_paths(zoo_dir: str | Path) -> dict[str, Path]:
    """name -> folder of a built block-expansion zoo (``base`` and one ``spec_<skill>`` a skill)."""
    root = Path(zoo_dir) / BLOCKS_DIR
    return {"base": root / "base", **{f"spec_{s}": root / f"spec_{s}" for s in SPECIALIST_SKILLS}}


def read_blocks_manifest(zoo_dir: str | Path) -> dict:
    path = Path(zoo_dir) / BLOCKS_DIR / "blocks.json"
    if not path.is_file():
        raise ZooError(f"{zoo_dir} has no block-expanded specialists; build them with "
                       f"`evomerge zoo --out {zoo_dir} --blocks`")
    return json.loads(path.read_text())


def expand(base: torch.nn.Module, at: int, n_blocks: int) -> torch.nn.Module:
    """A copy of ``base`` with ``n_blocks`` identity blocks inserted at layer index ``at``."""
    if not 1 <= at <= len(base.model.layers):
        raise ZooError(f"blocks go after an existing layer: at must be in 1..{len(base.model.layers)} "
                       f"(got {at})")
    model = copy.deepcopy(base)
    layers = model.model.layers  # the copy's own modules: the base is left as it was
    new = []
    for _ in range(n_blocks):
        block = copy.deepcopy(layers[at - 1])
        torch.nn.init.zeros_(block.self_attn.o_proj.weight)
        torch.nn.init.zeros_(block.mlp.down_proj.weight)
        new.append(block)
    model.model.layers = torch.nn.ModuleList([*layers[:at], *new, *layers[at:]])
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    model.config.num_hidden_layers = len(model.model.layers)
    if getattr(model.config, "layer_types", None) is not None:  # transformers keeps one per layer
        model.config.layer_types = [model.config.layer_types[0]] * len(model.model.layers)
    return model


def build_block_zoo(zoo_dir: str | Path, params: BlockZooParams = BlockZooParams(),
                    log=print) -> Path:
    """Trains the block-expanded specialists into ``<zoo_dir>/blocks`` unless an identical build
    is there."""
    zoo_dir = Path(zoo_dir)
    key = blocks_cache_key(zoo_dir, params)

    def build(tmp: Path) -> dict:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        manifest = read_manifest(zoo_dir)
        base_dir = zoo_dir / manifest["base"]
        tok = AutoTokenizer.from_pretrained(str(base_dir))
        seq_len = manifest["build"]["params"]["shape"]["seq_len"]
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        expanded = expand(base, params.at, params.n_blocks)
        expanded.save_pretrained(tmp / "base")
        tok.save_pretrained(tmp / "base")
        models = {"base": {"path": f"{BLOCKS_DIR}/base", "role": "base",
                           "note": f"the zoo base with {params.n_blocks} identity blocks at {params.at}"}}
        for i, skill in enumerate(SPECIALIST_SKILLS):
            t0 = time.perf_counter()
            model, steps, val_acc = _train_one(expanded, tok, seq_len, skill, i, params)
            model.save_pretrained(tmp / f"spec_{skill}")
            tok.save_pretrained(tmp / f"spec_{skill}")
            models[f"spec_{skill}"] = {"path": f"{BLOCKS_DIR}/spec_{skill}", "role": "specialist",
                                       "skill": skill, "task": f"zoo_{skill}", "steps": steps,
                                       "val_acc": val_acc}
            log(f"  blocks spec_{skill}: {steps} steps, val acc {val_acc:.3f}, "
                f"{time.perf_counter() - t0:.0f} s")
        return {"format": BLOCKS_FORMAT, "zoo_key": manifest["key"],
                "blocks": list(range(params.at, params.at + params.n_blocks)), "models": models,
                "params": asdict(params)}

    return build_cached(zoo_dir / BLOCKS_DIR, "blocks.json", key, params.threads,
                        "block-expanded specialists", build, log)


def _train_one(expanded, tok, seq_len: int, skill: str, i: int, params: BlockZooParams):
    """AdamW on the new blocks only: the skill's full range (answer-only), plus replay rows of the
    base's corpus (full-sequence loss) on which the blocks' relative change to the hidden state is
    penalized. Early stop on a validation set that is neither dev nor test."""
    model = copy.deepcopy(expanded)
    blocks = list(model.model.layers[params.at: params.at + params.n_blocks])
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [p for b in blocks for p in b.parameters()]
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained, lr=params.lr, betas=(0.9, 0.98), weight_decay=0.01)
    seen: dict[str, torch.Tensor] = {}

    def grab_in(module, args, kwargs):
        seen["in"] = args[0] if args else kwargs["hidden_states"]

    def grab_out(module, args, kwargs, output):
        seen["out"] = output[0] if isinstance(output, tuple) else output

    hooks = [blocks[0].register_forward_pre_hook(grab_in, with_kwargs=True),
             blocks[-1].register_forward_hook(grab_out, with_kwargs=True)]
    replay_batch = _base_batch(params.base_mix)
    rng = np.random.default_rng(params.seed + 300 + i)
    val = sample_items(skill, params.val_items, seed=30_000 + 100 * params.seed + i)
    val_acc, steps = 0.0, params.max_steps
    try:
        for step in range(params.max_steps):
            if step and step % params.eval_every == 0:
                val_acc = exact_match(model, tok, val, seq_len)
                if val_acc >= params.val_target:
                    steps = step
                    break
            model.train()
            n_replay = int(rng.binomial(params.batch, params.replay))
            items = replay_batch(rng, n_replay) + [SKILLS[skill].item(rng)
                                                   for _ in range(params.batch - n_replay)]
            ids, n_prompt = encode(tok, items, seq_len)
            logits = model(input_ids=ids).logits[:, :-1]
            mask = _target_mask(ids, n_prompt, tok.pad_token_id, answer_only=True)
            mask[:n_replay] = _target_mask(ids[:n_replay], n_prompt[:n_replay], tok.pad_token_id,
                                           answer_only=False)
            loss = F.cross_entropy(logits[mask], ids[:, 1:][mask])
            if params.identity and n_replay:
                h_in, h_out = seen["in"][:n_replay], seen["out"][:n_replay]
                change = (h_out - h_in).pow(2).sum(-1) / h_in.pow(2).sum(-1)
                loss = loss + params.identity * change.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            opt.step()
        else:
            val_acc = exact_match(model, tok, val, seq_len)
    finally:
        for h in hooks:
            h.remove()
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval(), steps, val_acc
