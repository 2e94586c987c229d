"""Console scripts for a shell, preloaded: `evomerge` and `lm_eval` on a PATH of the test's own,
each a thin client of a server that has imported their entry points once.

tests/test_readme.py runs every README block in a real bash, as written; each `evomerge ...` there
used to spend about 6 s (11 s on a loaded machine) importing torch, transformers and lm-eval. Here
the command bash starts is a small stdlib-only Python client: it hands its argv, environment,
folder and stdin/stdout/stderr (the file descriptors themselves) to the server, which forks a
process that runs the console script's entry point (read from the installed package metadata, as
the real script's wrapper does) with them, and the client exits with that process's status.

The server only imports (tests/cli_process.py's PRELOAD; no thread pool or Ray exists before a
fork). Its environment is the one the commands get; each forked command gets its client's
environment, plus what importing the entry points added (evomerge.cli's allocator setting).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from importlib.metadata import entry_points
from pathlib import Path

CLIENT = """#!{python} -IS
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect({sock!r})
socket.send_fds(s, [b"."], [0, 1, 2])
s.sendall(json.dumps({{"argv": sys.argv, "name": {name!r}, "env": dict(os.environ), "cwd": os.getcwd()}}).encode())
s.shutdown(socket.SHUT_WR)
status = int(b"".join(iter(lambda: s.recv(64), b"")) or b"-1")
code = os.waitstatus_to_exitcode(status) if status >= 0 else 1
if code < 0:  # killed by a signal: die of the same one, as the real process did
    signal = __import__("signal")
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def _run(entry, request: dict, fds: list[int], added_env: dict[str, str]) -> None:
    """The command's process: its client's stdin/stdout/stderr, environment, folder and argv; exits
    as the interpreter would after the console script's `sys.exit(entry())`."""
    import atexit
    import threading
    import traceback

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    for k, v in added_env.items():
        os.environ.setdefault(k, v)
    os.chdir(request["cwd"])
    sys.argv = request["argv"]
    sys.stdin = sys.__stdin__ = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = sys.__stdout__ = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    try:
        code = entry()
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc()
        code = 1
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    try:
        threading._shutdown()  # as the interpreter's exit: non-daemon threads first, then atexit
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)


def _handle(conn: socket.socket, entries: dict, added_env: dict[str, str]) -> None:
    """One client: fork its command, wait for it, answer its wait status."""
    _, fds, _, _ = socket.recv_fds(conn, 1, 3)
    request = json.loads(b"".join(iter(lambda: conn.recv(1 << 16), b"")))
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run(entries[request["name"]], request, fds, added_env)
    for fd in fds:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    conn.sendall(str(status).encode())


def serve(sock_path: str, names: list[str]) -> None:
    from cli_process import PRELOAD

    before = set(os.environ)
    # the entry points first: evomerge.cli sets its allocator variable before torch is imported
    entries = {n: next(iter(entry_points(group="console_scripts", name=n))).load() for n in names}
    for module in PRELOAD:
        importlib.import_module(module)
    added_env = {k: v for k, v in os.environ.items() if k not in before}
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the per-client processes reap themselves
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(sock_path)
    listener.listen(8)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            try:
                _handle(conn, entries, added_env)
            finally:
                os._exit(0)
        conn.close()


@contextlib.contextmanager
def preloaded_commands(env: dict[str, str], names=("evomerge", "lm_eval")):
    """``env`` with a PATH whose first folder holds ``names`` as clients of a preloaded server
    (started with ``env``); the server and every command it forked are killed at the end."""
    folder = Path(tempfile.mkdtemp(prefix="evomerge-cmds-"))
    sock = str(folder / "sock")
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    for name in names:
        client = bin_dir / name
        client.write_text(CLIENT.format(python=sys.executable, sock=sock, name=name))
        client.chmod(0o755)
    server = subprocess.Popen([sys.executable, __file__, sock, *names], env=env, stdout=subprocess.PIPE,
                              text=True, start_new_session=True, cwd=folder)
    try:
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the command server did not start (exit {server.wait()})")
        yield dict(env, PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        server.stdout.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2:])
