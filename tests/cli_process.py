"""`evomerge ...` in a process of its own, forked from a server that has already imported the
CLI's heavy dependencies.

A search started with `python -m evomerge.cli` spends about 6 s idle (11 s on a loaded machine)
importing torch, transformers and lm-eval before it does anything; the kill-and-resume tests start
dozens. Here each run is still a real process (its own pid and session, killed by a real
SIGKILL or SIGTERM, its exit status the CLI's), running the same `evomerge.cli.main.main(argv)`
as the console script, but forked from a multiprocessing fork server whose imports are done once.
The server only imports (no thread pool, Ray or lm-eval task index exists before a fork), and
its environment is the test process's at its start (tests/conftest.py's CPU-kernel pins included).

Use a real `python -m evomerge.cli` where the test is about the interpreter's start itself (the
README, the wheel).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

# Imported once by the fork server (multiprocessing.forkserver's preload): what every `evomerge
# search` imports. Installed modules only: Python 3.11's fork server does not take the tests' sys.path.
PRELOAD = ["torch", "transformers", "transformers.models.auto.modeling_auto",
           "transformers.models.llama.modeling_llama", "lm_eval.evaluator", "lm_eval.tasks",
           "lm_eval.models.huggingface", "evomerge.cli.main", "evomerge.runs.start",
           "evomerge.evaluation.evaluator"]


def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _child(argv: list[str], env: dict[str, str], cwd: str | None, out: str, err: str, ready) -> None:
    """The forked CLI: a session of its own (so the test can signal its whole group, as with
    `start_new_session=True`), the test's environment and folder, stdout and stderr to files."""
    os.setsid()
    ready.send(True)
    ready.close()
    os.environ.clear()
    os.environ.update(env)
    if cwd:
        os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    from evomerge.cli.main import main

    try:
        code = main(argv)
    finally:
        atexit._run_exitfuncs()  # as an interpreter's exit would (multiprocessing's child skips them)
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)


class CliProcess:
    """The parts of `subprocess.Popen` the tests use: pid, poll, wait, returncode, communicate
    (stdout and stderr together unless `separate`), for a CLI run forked by `start`."""

    def __init__(self, argv, env, cwd, separate: bool):
        self._dir = tempfile.mkdtemp(prefix="evomerge-cli-")
        weakref.finalize(self, shutil.rmtree, self._dir, True)
        self._out = os.path.join(self._dir, "out")
        self._err = os.path.join(self._dir, "err") if separate else self._out
        ctx = _context()
        recv, send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child, args=([str(a) for a in argv], dict(env or os.environ),
                                                      None if cwd is None else str(cwd), self._out,
                                                      self._err, send))
        self._proc.start()
        send.close()
        recv.recv()  # its session exists: os.killpg(pid, ...) reaches it from here on
        recv.close()
        self.pid = self._proc.pid
        self.args = argv

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode

    def poll(self) -> int | None:
        return self._proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._proc.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str | None]:
        self.wait(timeout)
        out = Path(self._out).read_text()
        err = None if self._err == self._out else Path(self._err).read_text()
        return out, err


def start(*argv, env: dict | None = None, cwd=None, separate: bool = False) -> CliProcess:
    """`evomerge *argv` in a new session, like `Popen(..., stdout=PIPE, stderr=STDOUT,
    start_new_session=True)`."""
    return CliProcess(argv, env, cwd, separate)


def run(*argv, env: dict | None = None, cwd=None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`evomerge *argv` to its end, like `subprocess.run(..., capture_output=True, text=True)`."""
    p = CliProcess(argv, env, cwd, separate=True)
    try:
        out, err = p.communicate(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise
    return subprocess.CompletedProcess(list(argv), p.returncode, out, err)
