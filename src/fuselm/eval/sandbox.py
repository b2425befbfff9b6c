"""Running code a model wrote (a HumanEval completion with its tests) in a child process with
limits, so that it sees nothing of the evaluating process and leaves nothing behind.

What the child gets: a fresh temporary working directory (also its HOME and TMPDIR), removed
afterwards; an environment of PATH, LANG, LC_ALL, HOME, TMPDIR and PYTHONHASHSEED only (no API
key, no FUSELM_* variable of the parent); no stdin; a session and process group of its own,
killed whole (SIGKILL) when the time limit passes and also when the program ends, so that no
process it started outlives it; rlimits on CPU time, file size, address space, core files and,
where the kernel enforces it (not for root), the number of processes; stdout and stderr read as
they come, of which at most `OUTPUT_KEEP` bytes each are kept and the rest discarded.

What it is not: a container. The network is not cut, the file system is not hidden (the child
runs as the same user and may read and write whatever that user may, within the file-size
limit), a root child can raise its own rlimits again, and a process that starts a session of its
own (setsid) leaves the process group and is not killed with it (RLIMIT_CPU still ends it once
it has used its CPU seconds). See docs/evaluation.md, "Sandbox".
"""

from __future__ import annotations

import math
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

OUTPUT_KEEP = 64 * 1024  # bytes of each of stdout and stderr kept (its head and its tail)
_READ = 64 * 1024
_DRAIN_S = 1.0  # after the group is killed: how long the pipes may take to close
# The child's environment, besides HOME and TMPDIR (its working directory).
_PATH = "/usr/local/bin:/usr/bin:/bin"
_ENV = {"PATH": _PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0"}


@dataclass(frozen=True)
class Limits:
    """What one program may use. `cpu_extra_s`: RLIMIT_CPU is the time limit plus this (the
    wall-clock limit, enforced by the parent, normally ends the program first)."""

    timeout_s: float = 10.0
    memory_bytes: int = 1 << 30  # RLIMIT_AS
    file_bytes: int = 1 << 20  # RLIMIT_FSIZE: the largest file it may write
    cpu_extra_s: int = 3
    extra_tasks: int = 64  # RLIMIT_NPROC above the user's tasks now (processes and threads; not for root)


@dataclass(frozen=True)
class Outcome:
    returncode: int | None  # negative: killed by that signal; None: it did not end by itself
    timed_out: bool
    stdout: bytes  # at most OUTPUT_KEEP bytes of what it wrote (and a marker where bytes were dropped)
    stderr: bytes
    dropped: int  # bytes of output read and thrown away
    workdir: str  # its working directory (removed by now)

    @property
    def ok(self) -> bool:
        """It ended by itself within the time limit with exit status 0."""
        return not self.timed_out and self.returncode == 0


class _Kept:
    """The head and the tail of a stream, OUTPUT_KEEP bytes at most, whatever its length."""

    def __init__(self, limit: int = OUTPUT_KEEP):
        self.half = limit // 2
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        room = self.half - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            if len(self.tail) > self.half:
                cut = len(self.tail) - self.half
                self.dropped += cut
                del self.tail[:cut]

    def value(self) -> bytes:
        mark = f"\n[... {self.dropped} bytes dropped ...]\n".encode() if self.dropped else b""
        return bytes(self.head) + mark + bytes(self.tail)


# Runs first in the child, with -I -S (nothing of the environment, no site): sets the rlimits
# and replaces itself with the program's interpreter. A wrapper rather than subprocess's
# preexec_fn, which may deadlock a child forked from a threaded process (the eval runner's rows
# run on threads).
_WRAPPER = """\
import os, resource, sys
for name, value in zip(("CPU", "FSIZE", "AS", "CORE", "NPROC"), map(int, sys.argv[1:6])):
    if value < 0:
        continue
    what = getattr(resource, "RLIMIT_" + name)
    soft, hard = resource.getrlimit(what)
    top = value + 1 if name == "CPU" else value  # CPU: SIGXCPU at the soft limit, SIGKILL a second later
    if hard != resource.RLIM_INFINITY:
        value, top = min(value, hard), min(top, hard)
    resource.setrlimit(what, (value, top))
os.execv(sys.argv[6], sys.argv[6:])
"""


def run_python(source: str, limits: Limits = Limits()) -> Outcome:
    """Run `source` as a Python program under `limits` (see the module's docstring)."""
    work = Path(tempfile.mkdtemp(prefix="fuselm-sandbox-"))
    try:
        program = work / "program.py"
        program.write_text(source, encoding="utf-8")
        env = {**_ENV, "HOME": str(work), "TMPDIR": str(work)}
        # -s -P -B with an environment of our own is what -I gives (no user site, not the script's
        # directory on sys.path, no PYTHON* variable but ours), except that PYTHONHASHSEED is
        # honoured (-I/-E ignore it): set and str hashes, hence their order, are the same on
        # every run. -B: imports write no .pyc files.
        python = [sys.executable, "-s", "-P", "-B", str(program)]
        cpu = math.ceil(limits.timeout_s) + limits.cpu_extra_s
        rlimits = [cpu, limits.file_bytes, limits.memory_bytes, 0, _nproc(limits.extra_tasks)]
        argv = [sys.executable, "-I", "-S", "-c", _WRAPPER, *map(str, rlimits), *python]
        return _run(argv, env, work, limits.timeout_s)
    finally:
        _remove(work)


def _run(argv: list[str], env: dict[str, str], work: Path, timeout: float) -> Outcome:
    proc = subprocess.Popen(
        argv,
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own session and process group: killed whole below
    )
    streams = {proc.stdout.fileno(): _Kept(), proc.stderr.fileno(): _Kept()}
    sel = selectors.DefaultSelector()
    for fd in streams:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    try:
        pidfd = os.pidfd_open(proc.pid)  # readable once the child has exited (not reaped)
        sel.register(pidfd, selectors.EVENT_READ)
    except (AttributeError, OSError):
        pidfd = None
    deadline = time.monotonic() + timeout
    exited = False
    try:
        while not exited:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in sel.select(left if pidfd is not None else min(left, 0.02)):
                if key.fd == pidfd:
                    exited = True
                else:
                    _read(key.fd, streams[key.fd], sel)
            if pidfd is None:
                exited = _has_exited(proc.pid)
    finally:
        # The child is not reaped yet, so its pid (the group's id) cannot have been reused.
        _kill_group(proc.pid)
        _drain(sel, streams, pidfd)
        proc.wait()
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
        proc.stdout.close()
        proc.stderr.close()
    out, err = streams.values()
    return Outcome(
        returncode=proc.returncode if exited else None,
        timed_out=not exited,
        stdout=out.value(),
        stderr=err.value(),
        dropped=out.dropped + err.dropped,
        workdir=str(work),
    )


def _read(fd: int, kept: _Kept, sel: selectors.BaseSelector) -> None:
    try:
        chunk = os.read(fd, _READ)
    except BlockingIOError:
        return
    if chunk:
        kept.add(chunk)
    else:
        sel.unregister(fd)


def _drain(sel: selectors.BaseSelector, streams: dict[int, _Kept], pidfd: int | None) -> None:
    """Read what is left in the pipes until they close; a process that left the group (setsid)
    and still holds them is given up on after _DRAIN_S."""
    if pidfd is not None:
        sel.unregister(pidfd)
    end = time.monotonic() + _DRAIN_S
    while sel.get_map() and time.monotonic() < end:
        for key, _ in sel.select(max(0.0, end - time.monotonic())):
            _read(key.fd, streams[key.fd], sel)


def _has_exited(pid: int) -> bool:
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _nproc(extra: int) -> int:
    """RLIMIT_NPROC for the child, or -1 for none: the kernel counts every task (process or
    thread) of the real user, and does not enforce the limit for root at all."""
    uid = os.getuid()
    if uid == 0:
        return -1
    try:
        return _user_tasks(uid) + extra
    except OSError:  # no /proc to count them: no limit rather than a limit the user is already over
        return -1


def _user_tasks(uid: int) -> int:
    n = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        try:
            if int(fields["Uid"].split()[0]) == uid:
                n += int(fields.get("Threads", "1"))
        except (KeyError, ValueError, IndexError):
            continue
    return n


def _remove(path: Path) -> None:
    """Remove the working directory, also where the program took its own permissions away."""
    shutil.rmtree(path, ignore_errors=True)
    if not path.exists():
        return
    try:  # its own directories made unreadable or read-only: allowed again (never through a link)
        os.chmod(path, stat.S_IRWXU)
        for root, dirs, _ in os.walk(path):
            for d in dirs:
                p = os.path.join(root, d)
                if not os.path.islink(p):
                    os.chmod(p, stat.S_IRWXU)
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)
