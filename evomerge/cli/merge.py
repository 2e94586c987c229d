"""`evomerge merge CONFIG.yml OUT_DIR`: a mergekit-compatible recipe in, a HF folder out."""

from __future__ import annotations

import argparse
import os
import sys

from evomerge.core.errors import UsageError

_DESCRIPTION = """\
Merge the models named in a mergekit-style YAML recipe and write a Hugging Face folder
(safetensors, config, tokenizer, generation config, and a model card holding the recipe, the
sha256 of the source weights and the library versions).

Methods: linear, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties,
della, della_linear, passthrough (see docs/merge.md). DARE/DELLA masks are keyed by the recipe's
mask_seed, so the same recipe always gives the same bytes.

A layer-order recipe (a `path:` of {model, layer, scale} steps, docs/dataflow.md) is written as a
plain model with its step scales folded into the output projections. A file of several YAML
documents is built stage by stage, as mergekit-multi does: each named document is built first and
later documents name it as a model.
"""

_EPILOG = """\
example:
  cat > ties.yml <<EOF
  merge_method: ties
  base_model: zoo/base
  models:
    - model: zoo/spec_add
      parameters: {weight: 1.0, density: 0.5}
    - model: zoo/spec_rev
      parameters: {weight: [0.5, 1.0], density: 0.5}
  dtype: float32
  EOF
  evomerge merge ties.yml merged/ties
"""


def _size(text: str) -> int:
    units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    t = text.strip().lower()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t.removesuffix("b"))


def _kmb(text: str) -> int:
    """mergekit's --out-shard-size (its parse_kmb): a count with an optional K, M or B suffix."""
    t = text.strip().lower()
    factor = {"k": 10**3, "m": 10**6, "b": 10**9}.get(t[-1:], 1)
    return int(t[:-1] if factor > 1 else t) * factor


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `merge` sub-command to an argparse sub-parser set."""
    p = subparsers.add_parser(
        "merge", help="merge models from a mergekit-style YAML recipe",
        description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", metavar="CONFIG.yml", help="merge recipe (mergekit YAML)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (must not exist)")
    p.add_argument("--device", default="cpu", help="where to merge: cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute dtype; overrides the recipe's dtype (default: the recipe's, "
                        "else the stored dtype)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickled .bin/.pt weights (torch.load with weights_only=True)")
    p.add_argument("--max-shard-size", type=_size, default="5GB",
                   help="largest safetensors shard, e.g. 2GB, 500MB (default 5GB)")
    p.add_argument("--out-shard-size", dest="max_shard_size", type=_kmb, metavar="SIZE",
                   help="mergekit's name for it: bytes with K, M or B (10^9) suffixes, e.g. 5B")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run `evomerge merge`; errors print one `error: ...` line to stderr and return 2."""
    # Large tensors on transparent huge pages (read by torch at its first allocation): a merge
    # touches every page of every tensor once, and 4 KiB page faults were a third of its time.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from evomerge.merge.writer import write_stages
    from evomerge.recipes.layer_path import load_stages

    try:
        stages = load_stages(args.config)
        if args.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise UsageError(f"--device {args.device}: CUDA is not available here")
        out = write_stages(stages, args.out_dir, device=args.device, dtype=args.dtype,
                           force=args.force, allow_pickle=args.allow_pickle,
                           max_shard_size=args.max_shard_size)
    except (ValueError, OSError) as err:
        msg = " ".join(str(err).split())  # one line, whatever the message holds
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m evomerge.cli.merge ...`) until evomerge.cli.main wires it in."""
    parser = argparse.ArgumentParser(prog="evomerge")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
