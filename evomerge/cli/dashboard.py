"""`evomerge dashboard RUN_DIR` (optuna-dashboard on the run's study) and `evomerge study sync RUN_DIR`."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from evomerge.core.errors import EvomergeError, UsageError


def cmd_study_sync(args: argparse.Namespace) -> int:
    from evomerge.runs.study import sync_study

    if args.storage is not None:
        check_storage_url(args.storage)
    added, total = sync_study(args.run_dir, args.storage)
    print(f"study of {args.run_dir}: {added} trials added, {total} in all")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise UsageError("optuna-dashboard is not installed: pip install 'evomerge[tracking]'") from None
    from evomerge.runs.folder import RunFolder
    from evomerge.runs.frozen import load_frozen
    from evomerge.runs.study import shown, study_target, sync_study

    if args.storage is not None:
        check_storage_url(args.storage)
    run = RunFolder.open(args.run_dir)
    target = study_target(run.path, load_frozen(run), args.storage)
    if target is None:
        raise UsageError(f"{args.run_dir}: its config has `study: null` (no study); give --storage URL")
    try:  # a finished or killed search's study may be behind its log; a live search keeps its own
        added, total = sync_study(run.path, args.storage)
        if added:
            print(f"study brought up to date with the log: {added} trials added, {total} in all", file=sys.stderr)
    except EvomergeError as e:
        print(f"note: the study was not synced ({e})", file=sys.stderr)
    print(f"optuna-dashboard on {shown(target.storage)}, study {target.name!r}: "
          f"http://{args.host}:{args.port}/dashboard/ (Ctrl-C stops it)", file=sys.stderr, flush=True)
    try:
        run_server(target.storage, host=args.host, port=args.port)
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise UsageError(f"cannot serve on {args.host}:{args.port}: {e.strerror} (--host, --port; another "
                             "dashboard may be running there: choose another port)") from None
        raise
    return 0


def port_number(text: str) -> int:
    """--port: a TCP port, 1 to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1 to 65535)")
    return port


def check_storage_url(url: str) -> None:
    """--storage: a SQLAlchemy URL with a driver that is installed, refused before anything opens."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url).get_dialect()
    except ArgumentError:
        raise UsageError(f"--storage: {url!r} is not a SQLAlchemy URL (e.g. sqlite:///optuna.db, "
                         "postgresql+psycopg://user@host/db)") from None
    except Exception as e:  # noqa: BLE001 - sqlalchemy's NoSuchModuleError for an unknown dialect
        raise UsageError(f"--storage: {url!r} cannot be used: {e}") from None


def add_parsers(sub) -> None:
    p = sub.add_parser("dashboard", help="serve optuna-dashboard on a run's Optuna study",
                       description="Starts optuna-dashboard on the Optuna study that mirrors the run's log "
                       "(RUN_DIR/optuna.db, or the storage in the run's config): trials, parameter importances, "
                       "parallel-coordinate and Pareto plots, live while the search runs. The study is first "
                       "brought up to date with the log when no search holds the run folder. See docs/tracking.md.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--port", type=port_number, default=8080, help="port (default 8080)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--storage", metavar="URL", help="the study's storage, when not the run's own")
    p.set_defaults(func=cmd_dashboard)

    s = sub.add_parser("study", help="the Optuna study that mirrors a run's log",
                       description="The run log is the search's truth; its Optuna study is a copy, written "
                       "while the search runs. `sync` rebuilds it from the log: the trials it lacks are added "
                       "(none twice), e.g. into a new storage or after the storage was down.")
    ss = s.add_subparsers(dest="study_command", required=True, metavar="COMMAND")
    sync = ss.add_parser("sync", help="bring the study up to date with the run log")
    sync.add_argument("run_dir", type=Path)
    sync.add_argument("--storage", metavar="URL", help="SQLAlchemy URL (default: the run's own, optuna.db)")
    sync.set_defaults(func=cmd_study_sync)
