"""Command line: each sub-command parses its arguments and calls one plain Python function.

Errors that come from the user's input (a missing folder, an unknown task, a bad config: an
`EvomergeError`, or a pydantic validation error) are printed as one ``error: ...`` line with exit
code 2; an OS error (a full disk, a permission) as one line with exit code 1; anything else is a
bug in evomerge and shows its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from evomerge.cli.dashboard import add_parsers as add_dashboard_parsers
from evomerge.cli.merge import add_parser as add_merge_parser
from evomerge.cli.refine import add_parser as add_refine_parser
from evomerge.core.env import quiet_libraries
from evomerge.core.errors import EvomergeError, UsageError
from evomerge.evaluation import BACKENDS
from evomerge.execution import EXECUTOR_NAMES, EXECUTORS, SOURCES

# Quiet, offline-friendly defaults; set before lm-eval, datasets or tqdm are imported.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


# ----------------------------------------------------------------------------- zoo
def cmd_zoo(args: argparse.Namespace) -> int:
    from evomerge.zoo.kernels import pin_kernels

    pin_kernels()  # before torch is imported: one zoo per key on every x86-64 machine
    import torch  # noqa: F401  (imported here so --help stays fast)

    from evomerge.zoo.build import ZooParams, build_zoo

    quiet_libraries()
    # a bar of training steps on a terminal, progress lines otherwise (a log)
    build_zoo(args.out, ZooParams(seed=args.seed), force=args.force, progress=sys.stderr.isatty(),
              log=lambda msg: print(msg, flush=True))
    if args.lora:  # the LoRA specialists, cached under their own key (evomerge/zoo/lora.py)
        from evomerge.zoo.lora import LoraZooParams, build_lora_zoo

        build_lora_zoo(args.out, LoraZooParams(seed=args.seed))
    if args.blocks:  # the block-expanded specialists, their own key too (evomerge/zoo/blocks.py)
        from evomerge.zoo.blocks import BlockZooParams, build_block_zoo

        build_block_zoo(args.out, BlockZooParams(seed=args.seed, threads=args.threads))
    return 0


def _add_zoo(sub) -> None:
    p = sub.add_parser("zoo", help="build the offline model zoo (tokenizer, base, specialists)",
                       description="Builds a character tokenizer, a small Llama base model pre-trained on a "
                       "synthetic corpus, and one specialist per skill (add, rev, sub) fine-tuned from it. "
                       "The same weights for a seed on every x86-64 machine (one training thread, pinned CPU "
                       "kernels; their sha256 in zoo.json); a second build with the same parameters does nothing.")
    p.add_argument("--out", type=Path, required=True, help="output folder (e.g. artifacts/zoo)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of --blocks' training (default 2; "
                   "the zoo itself trains on one, so that its weights do not depend on it)")
    p.add_argument("--force", action="store_true", help="replace a folder that holds something else")
    p.add_argument("--lora", action="store_true", help="also train one rank-8 LoRA adapter per skill "
                   "into OUT/lora (peft; under a minute on 2 cores; docs/lora.md)")
    p.add_argument("--blocks", action="store_true", help="also train the block-expanded specialists "
                   "into OUT/blocks (the data-flow case: docs/dataflow.md; about 6 minutes on 2 cores)")
    p.set_defaults(func=cmd_zoo)


# ----------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from evomerge.evaluation.backends import evaluate_folder
    from evomerge.evaluation.report import results_table

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [t for spec in args.tasks for t in spec.split(",") if t]
    results = evaluate_folder(args.model_dir, tasks, split=args.split, limit=args.limit,
                                 batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                                 allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                                 backend=args.backend)
    results_table({str(args.model_dir): results}, title=f"split={args.split or 'default'}").print()
    if args.json:
        import json

        print(json.dumps({t: {"metrics": r.metrics, "n": r.n_items} for t, r in results.items()}))
    return 0


def _positive_int(text: str) -> int:
    """argparse type of the eval counts: a bad value is a usage error (exit code 2), not a late
    message from deep inside lm-eval."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {text!r})") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {value})")
    return value


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score a model folder with lm-eval tasks",
                       description="Runs lm-eval (Hugging Face or vLLM backend) on a model folder and prints the task "
                       "metrics. The zoo tasks (zoo_add, zoo_rev, zoo_sub; tag: zoo; and zoo_rev_2shot, 2-shot; "
                       "generation tasks zoo_add_gen, zoo_rev_gen, zoo_sub_gen, zoo_rev_gen_2shot) are found "
                       "in evals/; any "
                       "registered lm-eval task name also works when its data is available; more task folders "
                       "can be added with EVOMERGE_TASKS=dir1:dir2. Task folders are trusted code: a task YAML's "
                       "'!function' runs Python from its folder, with your permissions; add only folders you trust.")
    p.add_argument("model_dir", type=Path, help="Hugging Face model folder (safetensors)")
    p.add_argument("--tasks", nargs="+", default=["zoo_add", "zoo_rev", "zoo_sub"],
                   help="task names, space or comma separated (default: the three zoo tasks)")
    p.add_argument("--split", default="test", help="dataset split to score: dev or test for the zoo tasks; "
                   "'default' keeps each task's own (default: test)")
    p.add_argument("--limit", type=_positive_int, default=None, help="score only the first N items of each task")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="fixed batch size (default 32; never 'auto')")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--backend", default="hf", choices=BACKENDS,
                   help="hf: lm-eval's Hugging Face backend; vllm: a vLLM engine (pip install 'evomerge[vllm]')")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled .bin weights (can run code)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code")
    p.add_argument("--json", action="store_true", help="also print the metrics as one JSON line")
    p.set_defaults(func=cmd_eval)


# ----------------------------------------------------------------------------- search
def cmd_search(args: argparse.Namespace) -> int:
    from evomerge.runs.start import run_search
    from evomerge.search.config import SearchConfig
    from evomerge.search.jobs import SearchStopped

    quiet_libraries()
    if args.config is None and args.resume is None:
        raise UsageError("give a CONFIG.yml to start a search, or --resume RUN_DIR")
    from evomerge.runs.staged import StagedConfig, run_staged, staged_file

    # A config with `stages:` (PS+DFS) runs stage by stage; its run folder says so on resume.
    staged = staged_file(args.config) if args.config else staged_file(Path(args.resume) / "config.yaml")
    if staged:
        cfg = StagedConfig.load(args.config) if args.config else None
        search = run_staged
    else:
        cfg = SearchConfig.load(args.config) if args.config else None
        search = run_search
    ray_kw = {}
    if args.workers is not None or args.ray_address or args.executor is not None:
        ray_kw = {"workers": args.workers, "ray_address": args.ray_address, "sources": args.sources,
                  "executor": args.executor}
    if args.study_storage is not None:
        from evomerge.search.config import StudyConfig

        try:  # a bad URL is refused before anything starts
            StudyConfig(storage=args.study_storage)
        except ValidationError as e:
            raise UsageError(f"--study-storage: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        if staged:
            raise UsageError("--study-storage applies to a one-stage search, not a staged config")
        ray_kw["study_storage"] = args.study_storage
    try:
        out = search(cfg, run_dir=args.resume or args.run_dir, resume=args.resume is not None,
                     quiet=args.quiet, config_path=args.config, **ray_kw)
    except SearchStopped as e:
        where = args.resume or args.run_dir or "the run folder"
        print(f"stopped; every finished candidate is saved. Resume with: evomerge search --resume {where}",
              file=sys.stderr)
        return 128 + e.signum  # 143 for SIGTERM, 130 for SIGINT, as a shell reports them
    if out.best_recipe is not None:
        print(f"best recipe: {out.run_dir / 'best.yaml'} (mergekit: {out.run_dir / 'best.mergekit.yaml'})")
    return 0


def _add_search(sub) -> None:
    p = sub.add_parser("search", help="run (or resume) an evolutionary merge search",
                       description="Searches merge recipes with CMA-ES (or random search) over a search space, "
                       "scoring each candidate with lm-eval in memory. Every candidate is logged to the run "
                       "folder as it finishes; a search killed at any moment resumes exactly with --resume.")
    p.add_argument("config", nargs="?", type=str, help="search config YAML (see docs/search.md)")
    p.add_argument("--resume", metavar="RUN_DIR", type=Path, help="continue the search in RUN_DIR; with a CONFIG, "
                   "its budget may be raised (other changes are refused)")
    p.add_argument("--run-dir", type=Path, help="run folder for a new search (default: run_dir of the config, "
                   "else runs/<config name>)")
    p.add_argument("--quiet", action="store_true", help="plain log lines instead of the live panel")
    p.add_argument("--executor", choices=EXECUTOR_NAMES, default=None,
                   help="where candidates are built and scored: " + "; ".join(
                       f"{name}: {e.help}" for name, e in EXECUTORS.items()) + " (default: ray when --workers N "
                   "or --ray-address is given, else local)")
    p.add_argument("--workers", type=_workers_arg, metavar="N", help="score candidates on N Ray workers "
                   "(auto: one per GPU of the cluster when device is cuda, else 1); 0 or omitted: in-process "
                   "(see docs/ray.md)")
    p.add_argument("--ray-address", metavar="ADDR", help="join a running Ray cluster (auto, or host:port of "
                   "its head); without it, --workers starts a private local Ray and stops it at the end")
    p.add_argument("--sources", choices=SOURCES, default="path",
                   help="how workers get the source models: from their folders, which every node must "
                   "read at the same path (default), or shipped through Ray's object store")
    p.add_argument("--study-storage", metavar="URL", help="SQLAlchemy URL of the Optuna study mirroring the run "
                   "log (default: RUN_DIR/optuna.db; e.g. postgresql+psycopg://user@host/db); frozen with the run "
                   "(docs/tracking.md)")
    p.set_defaults(func=cmd_search)


def _workers_arg(v: str) -> int | str:
    if v == "auto":
        return v
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {v!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return n


# ----------------------------------------------------------------------------- submit, jobs
def cmd_submit(args: argparse.Namespace) -> int:
    from evomerge.execution import submit as sub

    env = {}
    for kv in args.env:
        if "=" not in kv:
            raise UsageError(f"--env expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        env[k] = v
    job_id, run_dir, entry = sub.submit(args.config, args.address, run_dir=args.run_dir, workers=args.workers,
                                        sources=args.sources, working_dir=args.working_dir, env=env,
                                        submission_id=args.submission_id, resume=args.resume)
    print(f"submitted {job_id}: {entry}")
    print(f"run folder: {run_dir} (evomerge status {run_dir}; evomerge jobs --address {args.address})")
    if not args.wait:
        return 0
    status = sub.wait(args.address, job_id)
    print(sub.logs(args.address, job_id), end="")
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _add_submit(sub) -> None:
    from evomerge.execution.submit import default_address

    p = sub.add_parser("submit", help="launch a search on a Ray cluster (Ray job)",
                       description="Submits `evomerge search CONFIG --ray-address auto` to a Ray cluster through "
                       "its Job Submission API. The run folder must be on storage shared with the cluster; the "
                       "config and the model folders must be readable there at the paths given (see docs/ray.md).")
    p.add_argument("config", type=Path, nargs="?", help="search config YAML")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the search in RUN_DIR (on shared "
                   "storage) as a Ray job")
    p.add_argument("--address", default=default_address(), help="the cluster's dashboard address, http://HEAD:8265 "
                   "(default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--run-dir", type=Path, help="run folder on shared storage (default: run_dir of the config, else "
                   "runs/<config name>; made absolute here)")
    p.add_argument("--workers", type=_workers_arg, metavar="N", help="Ray workers (default auto: one per GPU of the "
                   "cluster when device is cuda, else 1)")
    p.add_argument("--sources", choices=SOURCES, default="path",
                   help="how workers get the source models (see evomerge search --help)")
    p.add_argument("--working-dir", type=Path, help="a folder uploaded with the job (Ray runtime_env working_dir): "
                   "the job runs inside it, relative paths resolve there")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment of the job "
                   "(repeatable); EVOMERGE_* variables of this shell are passed on")
    p.add_argument("--submission-id", help="the job's id (default: Ray's)")
    p.add_argument("--wait", action="store_true", help="wait until the job ends, print its log; exit 1 unless it "
                   "succeeded")
    p.set_defaults(func=cmd_submit)


def cmd_jobs(args: argparse.Namespace) -> int:
    import datetime

    from evomerge.evaluation.report import Table
    from evomerge.execution import submit as sub

    if args.logs:
        print(sub.logs(args.address, args.logs), end="")
        return 0
    jobs = sub.list_jobs(args.address)
    if not jobs:
        print(f"no jobs on {args.address}")
        return 0

    def when(ms):
        return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"

    rows = [[j["id"], j["status"], when(j["start"]), when(j["end"]), j["run_dir"] or j["entrypoint"][:60]]
            for j in jobs]
    Table(f"Ray jobs on {args.address}", ["job", "status", "started", "ended", "run folder"], rows).print()
    return 0


def _add_jobs(sub) -> None:
    from evomerge.execution.submit import default_address

    p = sub.add_parser("jobs", help="list the Ray jobs of a cluster with their state",
                       description="Lists the jobs of a Ray cluster (from `evomerge submit` or others): id, state "
                       "(PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED), times and run folder. A search's progress: "
                       "evomerge status RUN_DIR.")
    p.add_argument("--address", default=default_address(), help="the cluster's dashboard address, http://HEAD:8265")
    p.add_argument("--logs", metavar="JOB", help="print the log of one job instead")
    p.set_defaults(func=cmd_jobs)


# ----------------------------------------------------------------------------- status
def cmd_status(args: argparse.Namespace) -> int:
    import time

    from evomerge.runs.folder import RunFolder
    from evomerge.runs.status import plot_fitness, plot_pareto, read_status, status_table

    run = RunFolder.open(args.run_dir)  # kept across refreshes: each reads only what was appended
    while True:
        st = read_status(args.run_dir, run)
        status_table(st).print()
        plot = plot_fitness(st)
        if plot:
            print(f"plot: {plot}")
        pareto = plot_pareto(st)
        if pareto:
            print(f"Pareto plot: {pareto}")
        if not args.watch or st.finished:
            return 0
        time.sleep(args.interval)


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="show a search's progress and write its fitness plot",
                       description="Reads a run folder (while the search runs or after): generations, evaluations, "
                       "best fitness and its task metrics, speed, time so far and an estimate of the time left. "
                       "Writes RUN_DIR/fitness.png (best and population median per generation, a line per task) and, for "
                       "multi-objective runs, RUN_DIR/pareto.png (each pair of objectives, the front highlighted).")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--watch", action="store_true", help="refresh until the search finishes")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between refreshes (default 10)")
    p.set_defaults(func=cmd_status)


# ----------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from evomerge.core.io import atomic_write_text
    from evomerge.runs.export import (
        describe,
        mergekit_yaml,
        parse_weights,
        pick_from_front,
        recipe_from_run,
    )

    if args.weights is not None:
        if args.rank != 1:
            raise UsageError("give --weights or --rank, not both")
        weights = parse_weights(args.weights)
        recipe, record = pick_from_front(args.run_dir, weights)
        note = f"Pareto pick of {args.run_dir} for weights {args.weights}: {describe(record)}"
    else:
        recipe, record = recipe_from_run(args.run_dir, args.rank)
        note = f"rank {args.rank} of {args.run_dir}: {describe(record)}"
    text = mergekit_yaml(recipe, note) if args.format == "mergekit" else f"# {note}\n" + recipe.to_yaml()
    if args.out is None:
        print(text, end="")
        return 0
    if args.out.exists() and not args.force:
        raise UsageError(f"{args.out} exists; pass --force to overwrite it")
    atomic_write_text(args.out, text)
    print(f"wrote {args.out} ({describe(record)})", file=sys.stderr)
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write the best (or N-th best) recipe of a run",
                       description="Writes a run's recipe as evomerge YAML (exact: keeps mask_seed; `evomerge merge` "
                       "rebuilds the evaluated model) or mergekit YAML (models named as in your config; DARE/DELLA "
                       "masks reproduce only in distribution). Rank 1 is the winner after re-scoring.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--format", choices=["evomerge", "mergekit"], default="evomerge")
    p.add_argument("--out", type=Path, help="output file (default: standard output)")
    p.add_argument("--rank", type=int, default=1, help="1 = best (default), 2 = second best distinct recipe, ...")
    p.add_argument("--weights", metavar="TASK=W,...", help="multi-objective runs (optimizer nsga2): the Pareto-"
                   "front member with the largest weighted sum of task metrics, e.g. zoo_add=1,zoo_rev=0.5 "
                   "(tasks not named weigh 0)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.set_defaults(func=cmd_export)


# ----------------------------------------------------------------------------- materialize
def cmd_materialize(args: argparse.Namespace) -> int:
    from evomerge.runs.materialize import materialize

    quiet_libraries()
    if args.adapter:  # a merge of LoRA adapters as one PEFT adapter (evomerge/runs/adapter.py)
        from evomerge.runs.adapter import materialize_adapter

        out, info = materialize_adapter(args.run_dir, args.out, rank=args.rank, force=args.force)
        print(f"wrote adapter {out} (rank {info['r']}, recipe {info['recipe_hash'][:12]})")
        return 0
    out, info = materialize(args.run_dir, args.out, rank=args.rank, dtype=args.dtype, device=args.device,
                            force=args.force, score_test=not args.no_test)
    print(f"wrote {out} (recipe {info['recipe_hash'][:12]}, search fitness {info['record'].fitness:.4f})")
    for task, metrics in info["test"].items():
        print(f"  test {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def _add_materialize(sub) -> None:
    p = sub.add_parser("materialize", help="write a run's winner as a Hugging Face model folder",
                       description="Builds the run's best (or N-th best) recipe with the merge writer into OUT "
                       "(safetensors, config, tokenizer, and a model card with the sources and their hashes, the "
                       "recipe, the search's fitness and the test-split scores). In the search's dtype it equals, "
                       "tensor for tensor, the candidate that was evaluated.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the search's dtype")
    p.add_argument("--device", default="cpu")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-test", action="store_true", help="skip scoring the test split for the model card")
    p.add_argument("--adapter", action="store_true", help="write a PEFT LoRA adapter of the base instead "
                   "(task_arithmetic / linear merges of LoRA adapters; docs/lora.md)")
    p.set_defaults(func=cmd_materialize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description="Evolutionary model-merge optimizer.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_zoo(sub)
    _add_eval(sub)
    add_merge_parser(sub)
    _add_search(sub)
    _add_submit(sub)
    _add_jobs(sub)
    _add_status(sub)
    _add_export(sub)
    _add_materialize(sub)
    add_refine_parser(sub)
    add_dashboard_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "split", None) == "default":
        args.split = None
    try:
        return args.func(args)
    except (EvomergeError, ValidationError) as e:  # the user's input; anything else is a bug: a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a permission problem: say it in one line
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
