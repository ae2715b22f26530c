"""Process and port helpers for the integration tests and the demo.

Small on purpose; the whole API:

    free_port(host)                     -> int, a port that was free just now
    wait_port(host, port, timeout, proc=None)
                                        -> returns once a TCP connect works;
                                           TimeoutError, or RuntimeError if
                                           `proc` exited first
    start(argv, log_path, env=None, cwd=None) -> subprocess.Popen, stdout and
                                           stderr appended to log_path
    wait_exit(proc, timeout)            -> exit code; TimeoutError if still
                                           running (the process is left alone)
    stop(proc, timeout=5.0)             -> exit code; SIGTERM, then SIGKILL
                                           after `timeout` seconds
    tail(log_path, lines=40)            -> last lines of a log, for messages
    ProcGroup                           -> remembers what it started; stop_all()
                                           in a fixture's teardown

Processes are only ever signalled through the Popen object of a process
this module started (i.e. by PID), never by name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from typing import Mapping, Optional, Sequence

__all__ = ["free_port", "wait_port", "start", "wait_exit", "stop", "tail", "ProcGroup"]


# Under pytest-xdist, worker gwN hands out ports from its own block below
# the kernel's ephemeral range, so that two workers never pick the same port
# (grpcio servers bind with SO_REUSEPORT: two of them on one port would
# share its connections silently) and no client connection takes a port
# that was handed out but is not listened on yet.
_XDIST_BASE, _XDIST_BLOCK, _XDIST_WORKERS = 20000, 1000, 12
_next_port = 0


def _worker_block() -> Optional[range]:
    w = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not (w.startswith("gw") and w[2:].isdigit() and int(w[2:]) < _XDIST_WORKERS):
        return None
    lo = _XDIST_BASE + int(w[2:]) * _XDIST_BLOCK
    return range(lo, lo + _XDIST_BLOCK)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free for `host` just now.

    Outside pytest-xdist: one the kernel hands out (bind to port 0).  The port
    is released before returning, so another process may take it in between;
    on a test machine that race is rare enough.  Under pytest-xdist: the next
    free one of this worker's block (see above).
    """
    global _next_port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    block = _worker_block()
    if block is None:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return s.getsockname()[1]
    for _ in range(len(block)):
        port = block[_next_port % len(block)]
        _next_port += 1
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))  # in use, or in TIME_WAIT: the next one
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port left in {block}")


def wait_port(host: str, port: int, timeout: float = 10.0,
              proc: Optional[subprocess.Popen] = None) -> None:
    """Block until a TCP connection to host:port succeeds.

    With `proc`, give up as soon as that process has exited: a server that
    crashed at startup should fail the test at once, not after `timeout`.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} "
                               f"before {host}:{port} accepted connections")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} not accepting connections after {timeout} s")
        time.sleep(0.05)


def start(argv: Sequence[str], log_path: str, env: Optional[Mapping[str, str]] = None,
          cwd: Optional[str] = None) -> subprocess.Popen:
    """Start argv with stdout and stderr appended to log_path.

    The child gets its own session so that a Ctrl-C aimed at pytest does not
    also hit it half-way through a test; teardown stops it explicitly.
    """
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    # Unbuffered Python children: logs are readable while they run.
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=full_env, cwd=cwd,
                                start_new_session=True)
    finally:
        log.close()  # the child holds its own descriptor


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    """Exit code of proc once it has exited; TimeoutError if it has not."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"process {proc.pid} still running after {timeout} s") from None


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> int:
    """SIGTERM proc, SIGKILL it if it has not exited after `timeout`; exit code."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=timeout)
    except ProcessLookupError:
        return proc.wait(timeout=timeout)


def tail(log_path: str, lines: int = 40) -> str:
    """The last `lines` lines of a log file ('' if it does not exist)."""
    try:
        with open(log_path, "rb") as f:
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


class ProcGroup:
    """The processes one test started, so teardown can stop every one of them.

        group = ProcGroup(tmp_path)
        link = group.start("superlink", [...])   # log: tmp_path/superlink.log
        ...
        group.stop_all()                          # in teardown
    """

    def __init__(self, log_dir: str):
        self.log_dir = str(log_dir)
        self.procs: dict[str, subprocess.Popen] = {}

    def log_path(self, name: str) -> str:
        return os.path.join(self.log_dir, f"{name}.log")

    def start(self, name: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        if name in self.procs:
            raise ValueError(f"a process named {name!r} was already started")
        proc = start(argv, self.log_path(name), **kwargs)
        self.procs[name] = proc
        return proc

    def logs(self, lines: int = 40) -> str:
        """Tails of every log, for assertion messages."""
        return "\n".join(f"--- {name} (pid {p.pid}, rc {p.poll()}) ---\n"
                         f"{tail(self.log_path(name), lines)}"
                         for name, p in self.procs.items())

    def stop_all(self, timeout: float = 5.0) -> dict[str, int]:
        return {name: stop(p, timeout) for name, p in self.procs.items()}
