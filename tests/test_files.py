"""The bottom-layer file helpers: atomic writes keep ordinary permissions, digests see changes,
a directory's lock is held by one process at a time."""

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from fuselm.errors import FuselmError
from fuselm.files import DirLock, atomic_dir, atomic_write, content_digest

from .support import locker as _locker


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_get_the_modes_a_plain_write_would(tmp_path, umask_027):
    """tempfile makes private files (0600) and directories (0700); what fuselm writes atomically
    (a calibration, a model directory for another engine's user) must be readable as if it had
    been written with open() and mkdir()."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    (tmp_path / "plain_dir").mkdir()
    atomic_write(tmp_path / "calib.yaml", "task: nq\n")
    assert _mode(tmp_path / "calib.yaml") == _mode(plain) == 0o640
    with atomic_dir(tmp_path / "model") as d:
        (d / "config.json").write_text("{}")
    assert _mode(tmp_path / "model") == _mode(tmp_path / "plain_dir") == 0o750
    # a file written again keeps the mode its owner gave it
    os.chmod(tmp_path / "calib.yaml", 0o600)
    atomic_write(tmp_path / "calib.yaml", "task: triviaqa\n")
    assert _mode(tmp_path / "calib.yaml") == 0o600
    assert (tmp_path / "calib.yaml").read_text() == "task: triviaqa\n"


def test_content_digest_sees_a_changed_file_and_a_directory_s_own_files(tmp_path):
    f = tmp_path / "ctl.json"
    f.write_text("{}")
    first = content_digest(f)
    assert content_digest(f) == first
    f.write_text("{ }")
    assert content_digest(f) != first
    d = tmp_path / "router"
    (d / "checkpoint").mkdir(parents=True)
    (d / "router.json").write_text("{}")
    before = content_digest(d)
    (d / "checkpoint" / "optimizer.safetensors").write_bytes(b"state")  # not what is loaded
    assert content_digest(d) == before
    (d / "router.json").rename(d / "renamed.json")  # the same bytes under another name
    assert content_digest(d) != before


def test_a_killed_writer_s_temporaries_are_removed_by_the_next_write_once_stale(tmp_path):
    """A SIGKILL between mkstemp and the rename leaves `.NAME.<random>.tmp` (a gigabyte during a
    model's assembly); the next atomic write of NAME removes it once an hour old, and leaves a
    fresh one (maybe another writer's) and files that only look alike."""
    hour_ago = time.time() - 2 * 3600
    stale, fresh, other = tmp_path / ".m.gguf.ab12cd34.tmp", tmp_path / ".m.gguf.zz99yy88.tmp", tmp_path / ".m.gguf.bak"
    for f in (stale, fresh, other):
        f.write_bytes(b"partial")
    os.utime(stale, (hour_ago, hour_ago))
    os.utime(other, (hour_ago, hour_ago))
    atomic_write(tmp_path / "m.gguf", b"whole")
    assert not stale.exists() and fresh.exists() and other.exists()
    assert (tmp_path / "m.gguf").read_bytes() == b"whole"
    stale_dir = tmp_path / ".hf.q1w2e3r4"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"partial")
    os.utime(stale_dir, (hour_ago, hour_ago))
    with atomic_dir(tmp_path / "hf") as d:
        (d / "config.json").write_text("{}")
    assert not stale_dir.exists() and (tmp_path / "hf" / "config.json").is_file()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_two_processes_racing_for_a_lock_never_both_hold_it(tmp_path):
    """The race of the old stale-lock takeover: a lock file left by a dead process, and two
    processes that find it at once. Each round, exactly one may hold the lock at any moment."""
    refused = 0
    for round_ in range(20):
        d = tmp_path / f"run{round_}"
        d.mkdir()
        (d / DirLock.NAME).write_text(f"{_dead_pid()}\n")  # a killed holder's file
        go = tmp_path / f"go{round_}"
        procs = [_locker(d, go, 0.3) for _ in range(2)]
        assert [p.stdout.readline() for p in procs] == ["ready\n"] * 2
        go.touch()  # both spin on it: they take the lock within a moment of each other
        outs = [p.communicate(timeout=60) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
        lines = [o[0].splitlines() for o in outs]
        assert not any("BOTH" in ls for ls in lines), lines
        intervals = [tuple(map(float, ln.split()[1:])) for ls in lines for ln in ls if ln.startswith("interval")]
        if len(intervals) == 2:  # both held it, one after the other (one started late): never at once
            (a0, a1), (b0, b1) = sorted(intervals)
            assert a1 <= b0, intervals
        else:
            refused += 1
            (msg,) = [ln for ls in lines for ln in ls if ln.startswith("refused")]
            holder = next(ln.split()[1] for ls in lines for ln in ls if ln.startswith("held"))
            assert f"is in use by another fuselm run (pid {holder})" in msg
        assert not (d / DirLock.NAME).exists()  # released: removed
    assert refused >= 10  # they did race (one more than 0.3 s late is rare)


def test_a_killed_holder_s_lock_is_taken_at_once_by_the_next_process(tmp_path):
    holder = _locker(tmp_path, "-", 600)
    try:
        assert holder.stdout.readline() == "ready\n"
        assert holder.stdout.readline() == f"held {holder.pid}\n"
        with pytest.raises(FuselmError, match=rf"is in use by another fuselm eval \(pid {holder.pid}\); wait"):
            DirLock(tmp_path, "eval").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / DirLock.NAME).read_text().strip() == str(holder.pid)  # left behind, as a crash leaves it
    with DirLock(tmp_path, "eval"):  # no staleness rule to wait for: the kernel released it with the process
        assert (tmp_path / DirLock.NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(FuselmError, match=rf"in use by another fuselm eval \(pid {os.getpid()}\)"):
            DirLock(tmp_path, "eval").acquire()  # also another lock of this process
    assert not (tmp_path / DirLock.NAME).exists()
