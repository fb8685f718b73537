"""``python -m flowvae ARGS`` in a new process without the interpreter's start: a server imports
torch (and the torch._dynamo that torch.optim's constructors pull in), flowvae's CLI,
TensorBoard and matplotlib once, then runs each command in a forked child with its own working
directory, environment, stdout and stderr, and reports its exit status. The child is a separate
process running the real CLI (flowvae.cli.main, as ``python -m flowvae`` does), so what one
command imports or registers (a plugin file, say) is gone for the next; what it does not
exercise is the interpreter's own start, which the tests that run ``python -m flowvae`` cover.
It saves about 3.5 s of CPU a command."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER = r"""
import importlib, json, os, select, sys, traceback
import torch
torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo, once
from torch.utils.tensorboard import SummaryWriter  # noqa
import matplotlib.pyplot  # noqa
import flowvae.cli, flowvae.experiments, flowvae.plots, flowvae.train  # noqa


def child(req):
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    # what PYTHONPATH adds to a new interpreter's path, and python -m's working directory first
    extra = [p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = [os.getcwd(), *(p for p in extra if p not in sys.path)]
    importlib.invalidate_caches()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    mode = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if req.get("append") else os.O_TRUNC)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        os.dup2(os.open(path, mode, 0o600), fd)
    if "code" in req:  # a Python script, as python -c runs it
        sys.argv = ["-c"]
        exec(compile(req["code"], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = ["flowvae", *req["args"]]
        flowvae.cli.main()


def run(req):
    code = 1
    try:
        os.setsid()  # a process group of its own, as start_new_session gives
        child(req)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def say(line):
    os.write(1, (line + "\n").encode())


# Requests come in on stdin, one JSON line each, and are answered "started PID"; each child's end
# is reported when it comes, "exit PID STATUS", so that several children may run at once.
say("ready")
buf, children = b"", set()
while True:
    if select.select([0], [], [], 0.02)[0]:
        chunk = os.read(0, 65536)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            pid = os.fork()
            if pid == 0:
                run(json.loads(line))
            children.add(pid)
            say(f"started {pid}")
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            children.discard(pid)
            say(f"exit {pid} {os.waitstatus_to_exitcode(status)}")
"""


class ForkedProcess:
    """A forked child as much of :class:`subprocess.Popen` as the tests use: ``pid`` (its own
    process group's, too), ``poll``, ``wait``, ``send_signal`` and ``communicate`` (stdout if it
    was kept, and stderr)."""

    def __init__(self, server: ForkServer, pid: int, args, out: Path | None, err: Path) -> None:
        self.server, self.pid, self.args, self.out, self.err = server, pid, args, out, err
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.answer(self.pid, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self.server.answer(self.pid, 1e9 if timeout is None else timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str | None, str]:
        self.wait(timeout)
        return (self.out.read_text() if self.out else None), self.err.read_text()

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)


class ForkServer:
    """One server process, its children started by :meth:`start` (several may run at once) or
    run to their end by :meth:`run`."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = env
        self.folder = Path(tempfile.mkdtemp(prefix="flowvae-fork-"))
        self.log = self.folder / "server.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SERVER],
                cwd=cwd,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        self.buf = b""
        self.exits: dict[int, int] = {}  # children that ended, not yet asked for
        self.count = 0
        assert self._line(180) == "ready", self.log.read_text()

    def _line(self, timeout: float) -> str | None:
        """The server's next line; None if none came within ``timeout`` s (0: what is there)."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = max(0.0, deadline - time.monotonic())
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 4096)
                assert chunk, f"fork server died: {self.log.read_text()[-2000:]}"
                self.buf += chunk
            elif left == 0:
                return None
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def _until(self, want: str, timeout: float) -> list[str] | None:
        """Read lines, keeping exit reports, until one starts with ``want``: its words."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._line(max(0.0, deadline - time.monotonic()))
            if line is None:
                return None
            words = line.split()
            if words[0] == "exit":
                self.exits[int(words[1])] = int(words[2])
            if line.startswith(want):
                return words

    def submit(self, req: dict) -> int:
        """Start one request (cwd, env, stdout and stderr paths, append, and args or code);
        the child's pid. :meth:`answer` then gives its exit status."""
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        words = self._until("started", 60)
        assert words, f"fork server did not start the run: {self.log.read_text()[-2000:]}"
        return int(words[1])

    def answer(self, pid: int, timeout: float) -> int | None:
        """Child ``pid``'s exit status (-9 when SIGKILLed); None if it is still running after
        ``timeout`` s."""
        if pid not in self.exits and self._until(f"exit {pid} ", timeout) is None:
            return None
        return self.exits.pop(pid)

    def start(
        self,
        args: list[str] | None = None,
        code: str | None = None,
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
        keep_stdout: bool = True,
    ) -> ForkedProcess:
        """``flowvae ARGS`` (or the Python ``code``) started in a forked child."""
        self.count += 1
        out = self.folder / f"{self.count}.out" if keep_stdout else None
        err = self.folder / f"{self.count}.err"
        req = {"cwd": str(cwd or os.getcwd()), "env": env or self.env}
        req |= {"stdout": str(out or os.devnull), "stderr": str(err)}
        req |= {"code": code} if code is not None else {"args": [str(a) for a in args]}
        what = [str(a) for a in args] if code is None else ["-c", code]
        return ForkedProcess(self, self.submit(req), what, out, err)

    def run(self, args=None, code=None, cwd=None, env=None, timeout: float = 300):
        """:meth:`start`, then its end: a CompletedProcess (text), as subprocess.run gives."""
        proc = self.start(args, code, cwd, env)
        try:
            out, err = proc.communicate(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)
            raise
        for path in (proc.out, proc.err):
            path.unlink()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc.stdout.close()
        shutil.rmtree(self.folder, ignore_errors=True)
