"""Fresh Python processes without the cost of importing torch each time (not a test module).

Several tests run code in a process of its own: a CLI run killed with SIGKILL and resumed
(test_faults.py), a model loaded where compressdrop was never imported (test_hf.py,
test_formats.py). A new interpreter spends seconds importing torch, transformers, scikit-learn
and torch's exporter before it does any of that, and those tests started 25 of them. (The tests
that check what a new interpreter imports, or that start one through a launcher, still start one.)

:class:`Prewarmed` starts one interpreter that runs a few imports (``preload``) and nothing else,
then forks it once per :meth:`Prewarmed.run`: each child is a separate process with its own
memory, file descriptors and exit status (a signal that ends it is a negative return code, as
with :mod:`subprocess`), runs ``code`` as ``python -c code *args`` would (a new ``__main__``,
``sys.argv``, working directory and environment of its own) and finds only the preloaded modules
imported. What a test checks about a module never being imported stays true as long as
``preload`` does not import it.

The preloaded interpreter runs no torch operation before it forks (its one thread forks; no
thread pool exists yet) and imports no onnxruntime (whose import starts a thread).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

_SERVER = r"""
import atexit, json, os, sys, traceback, types

# the requests and answers on descriptors of their own: whatever the preload prints goes to the
# server's log, not into the answers
requests, answers = os.fdopen(os.dup(0), "rb", buffering=0), os.fdopen(os.dup(1), "w")
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
os.dup2(2, 1)
exec(compile(sys.argv[1], "<preload>", "exec"), {"__name__": "__preload__"})
sys.stdout.flush()
sys.stderr.flush()
print("ready", file=answers, flush=True)


def child(req):
    requests.close()
    answers.close()
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for fd, target in ((null, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)
    sys.argv = ["-c", *req["args"]]
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    status = 0
    try:
        exec(compile(req["code"], "<string>", "exec"), main.__dict__)
    except SystemExit as e:
        if e.code is None:
            status = 0
        elif isinstance(e.code, int):
            status = e.code
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException as e:  # as Python prints it: from the code's own frames
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        status = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


while line := requests.readline():
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            child(req)
        finally:
            os._exit(70)
    print(json.dumps({"pid": pid}), file=answers, flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=answers, flush=True)
"""


class Prewarmed:
    """An interpreter that has run ``preload`` (Python source: imports), forked for each run.

    Use as a context manager (or call :meth:`close`); one run at a time.
    """

    def __init__(
        self,
        preload: str,
        cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="prewarmed")
        self._log = open(Path(self._dir.name) / "server.txt", "w+b")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=cwd,
            env=env,  # what the interpreter starts with (its sys.path); each run has its own
        )
        self._runs = 0
        self._pending = b""
        if self._answer(timeout=300) != "ready":
            self.close()
            raise RuntimeError(f"the preloaded interpreter did not start: {self._server_log()}")

    def _server_log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-3000:]

    def _answer(self, timeout: float | None) -> str:
        """The server's next line (read from the descriptor itself: a buffered reader could
        hold the next answer where ``select`` does not see it)."""
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                raise subprocess.TimeoutExpired("prewarmed", timeout or 0)
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the preloaded interpreter ended: {self._server_log()}")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode().strip()

    def run(
        self,
        code: str,
        *args: str,
        cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        check: bool = False,
    ) -> subprocess.CompletedProcess:
        """``python -c code *args`` in a child of the preloaded interpreter: its return code
        (``-9`` when SIGKILL ended it) and its stdout and stderr as text, as
        ``subprocess.run(..., capture_output=True, text=True)`` gives them.

        Raises:
            subprocess.TimeoutExpired: the child ran past ``timeout`` s (it is killed).
            subprocess.CalledProcessError: ``check`` and a return code other than 0.
        """
        assert self._proc.stdin is not None
        self._runs += 1
        out = Path(self._dir.name) / f"out{self._runs}"
        err = Path(self._dir.name) / f"err{self._runs}"
        request = {
            "code": code,
            "args": [str(a) for a in args],
            "cwd": str(cwd or os.getcwd()),
            "env": dict(os.environ if env is None else env),
            "stdout": str(out),
            "stderr": str(err),
        }
        self._proc.stdin.write(json.dumps(request).encode() + b"\n")
        self._proc.stdin.flush()
        pid = json.loads(self._answer(timeout=60))["pid"]
        start = time.monotonic()
        try:
            returncode = json.loads(self._answer(timeout=timeout))["returncode"]
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            self._answer(timeout=60)  # the server reaps it
            raise subprocess.TimeoutExpired(
                [code, *args], time.monotonic() - start, out.read_bytes(), err.read_bytes()
            ) from None
        done = subprocess.CompletedProcess(
            ["python", "-c", code, *args],
            returncode,
            out.read_text(errors="replace"),
            err.read_text(errors="replace"),
        )
        out.unlink()
        err.unlink()
        if check and returncode != 0:
            sys.stderr.write(done.stderr)  # shown with the failure, as a new interpreter's would be
            done.check_returncode()
        return done

    def close(self) -> None:
        """End the preloaded interpreter (between runs: no child of it is left)."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()
        self._proc.kill()  # it holds nothing to write: no need to wait for torch's clean-up
        self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._log.close()
        self._dir.cleanup()

    def __enter__(self) -> Prewarmed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
