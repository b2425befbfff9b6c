"""Files written so that a crash never loses or tears what was done: the one place for atomic
whole-file writes, fsynced JSONL appends, YAML loading, content digests and the lock of a
working directory.

A bottom-layer module: it imports nothing of fuselm but errors.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from .errors import FuselmError


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would, for a moment, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _plain_mode(path: Path, directory: bool) -> int:
    """The mode `path` keeps, or the one a plain open()/mkdir() would give it: tempfile's are
    private (0600, 0700), and a model directory or calibration file that only its writer can
    read is useless to an engine or a colleague running as another user."""
    if path.exists():
        return path.stat().st_mode & 0o7777
    return (0o777 if directory else 0o666) & ~_umask()


STALE_TEMP_S = 3600.0  # a temporary file or directory untouched this long belongs to a killed writer


def _remove_stale_temps(path: Path, directory: bool) -> None:
    """Remove what writers of `path` killed before they could clean up left beside it (a
    SIGKILL during a model's assembly leaves a gigabyte): the temporaries this module names
    `.NAME.<random>.tmp` (files) or `.NAME.<random>` (directories), untouched for an hour."""
    pattern = re.compile(re.escape(f".{path.name}.") + (r"[a-z0-9_]{8}" if directory else r"[a-z0-9_]{8}\.tmp") + "$")
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return
    now = time.time()
    for p in siblings:
        try:
            if pattern.match(p.name) and p.is_dir() == directory and now - p.stat().st_mtime > STALE_TEMP_S:
                shutil.rmtree(p) if directory else p.unlink()
        except OSError:  # another process removed it first, or it is not ours to remove
            continue


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file beside `path` that replaces it on success and is removed on failure, for
    writers that want a file name (safetensors, GGUF): a half-written file never has the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path, directory=False)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _plain_mode(path, directory=False))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write `path` whole or not at all."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temporary directory beside `path` that replaces it (whole) once the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path, directory=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, _plain_mode(path, directory=True))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def append_jsonl(path: str | Path, item: Any) -> None:
    """Append one JSON line and fsync it: once this returns, the line survives a crash."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(item, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[Any]:
    """The complete lines of an append-only JSONL file. A torn tail (a crash mid-append: a line
    without its newline or not valid JSON, and everything after it) is cut off the file, so the
    next append starts on a clean line."""
    path = Path(path)
    if not path.is_file():
        return []
    good: list[Any] = []
    keep_bytes = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            if line.strip():
                try:
                    good.append(json.loads(line))
                except json.JSONDecodeError:
                    break
            keep_bytes += len(line)
    if keep_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(keep_bytes)
    return good


def content_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, or of the files directly in a directory (names and bytes, in
    order; not its subdirectories, e.g. a router's training checkpoint): whether what a run was
    made with is still the same."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        if f is not path:
            digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping, with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FuselmError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise FuselmError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise FuselmError(f"{path}: expected a mapping at the top level")
    return data


class DirLock:
    """An exclusive lock on a working directory (an evaluation run, a training run): an OS lock
    (`flock`) on the lock file, held through an open descriptor for the lock's life; the file
    also holds the owner's pid, for the error. A second process is refused with a one-line error
    naming the holder. A holder that dies (killed, crashed) releases the lock with its
    descriptors, in the kernel: the next process takes it at once, and two processes can never
    both hold it. A released lock's file is removed.

    >>> with DirLock(run_dir):  # doctest: +SKIP
    ...     work()
    """

    NAME = ".lock"

    def __init__(self, directory: str | Path, what: str = "run"):
        self.path = Path(directory) / self.NAME
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):  # another holder removed the file between our open and our lock: again
            writable = True
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except PermissionError:  # another user's lock file: whether it is held, at least
                writable = False
                fd = _open_or_say(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise FuselmError(f"cannot open the lock file {self.path}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                os.close(fd)
                raise FuselmError(
                    f"{self.path.parent} is in use by another fuselm {self.what} (pid {holder}); "
                    "wait for it to finish or stop it"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            if not _same_file(fd, self.path):  # locked a file its holder removed on release
                os.close(fd)
                continue
            if not writable:
                os.close(fd)
                raise FuselmError(
                    f"cannot write the lock file {self.path} (another user's?); remove it or run as its owner"
                )
            try:
                os.ftruncate(fd, 0)  # a killed holder's pid may still be there
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return
        raise FuselmError(f"could not take the lock {self.path}")

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):  # removed while held: whoever opened it meanwhile sees that and opens anew
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # releases the flock

    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _open_or_say(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags)
    except OSError as e:
        raise FuselmError(f"cannot open the lock file {path}: {e.strerror}") from None


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _lock_holder(fd: int) -> str:
    """The pid written in a held lock file. The holder writes it just after taking the lock, so
    for a moment the file may be empty or still hold a killed holder's pid: read again until it
    names a live process (for half a second at most)."""
    text = ""
    for _ in range(50):
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if text.isdigit() and _pid_alive(int(text)):
            return text
        time.sleep(0.01)
    return text or "unknown"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
