"""The bottom-layer file helpers: atomic writes keep ordinary permissions, digests see changes."""

import os
import stat
import time

import pytest

from fuselm.files import atomic_dir, atomic_write, content_digest


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
