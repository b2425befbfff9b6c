"""The bottom-layer file helpers: atomic writes keep ordinary permissions, digests see changes."""

import os
import stat

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
