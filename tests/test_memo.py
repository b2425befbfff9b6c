"""The memo of single-model work (eval/memo.py): a model alone runs once per row, and every later
run of the same model on the same rows, or a fused multiple-choice run over it, reads its
answers; a changed setting or model file is another key; processes share the store."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuselm.config import GenerationConfig, ModelConfig
from fuselm.eval.memo import Memo, generation_key, memo_path, model_key
from fuselm.eval.records import EvalSpec
from fuselm.eval.rundir import read_rows
from fuselm.eval.runner import run_eval

from .conftest import ROOT, run_cli
from .support import answer_rows, write_task


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]


def without_cost(row: dict) -> dict:
    """A row as the model made it: what the memo serves again unchanged (the seconds add the
    scoring of this run; `memo` says where it came from)."""
    return {k: v for k, v in row.items() if k not in ("seconds", "cpu_seconds", "memo")}


@pytest.fixture
def model_copy(answer_models, tmp_path):
    """The `right` model in a directory of this test's own (its files are changed here)."""
    return Path(shutil.copytree(answer_models["right"], tmp_path / "right"))


def test_a_second_eval_of_a_single_model_is_read_from_the_memo(model_copy, tmp_path):
    data = answer_rows(tmp_path, 4)
    args = ["eval", "--task", "triviaqa", "--models", str(model_copy), "--data-dir", str(data), "--data",
            str(data / "triviaqa" / "rows.jsonl"), "--max-new-tokens", "3", "--no-progress"]  # fmt: skip
    first = run_cli(*args, "--out", str(tmp_path / "first"))
    assert first.returncode == 0, first.stderr
    made = rows_of(tmp_path / "first")
    assert len(made) == 4 and not any(r.get("memo") for r in made)
    assert all(r["output"] == " a a a" and r["forward_passes"]["right"] > 0 for r in made)

    # The weights made garbage in place, with the same size and modification time: the memo's
    # key still matches (it reads no weights), and a run that loaded the model would fail.
    # It does not fail and gives the same rows: no model ran.
    weights = model_copy / "model.safetensors"
    kept = tmp_path / "model.safetensors.kept"
    shutil.copy2(weights, kept)
    stat = weights.stat()
    weights.write_bytes(b"\0" * stat.st_size)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = run_cli(*args, "--out", str(tmp_path / "second"))
    assert second.returncode == 0, second.stderr
    served = rows_of(tmp_path / "second")
    assert [without_cost(r) for r in served] == [without_cost(r) for r in made]
    assert all(r["memo"] for r in served) and json.loads(second.stdout)["memo_rows"] == 4
    # the cost as measured when it ran (plus this run's scoring of the text: microseconds)
    assert [r["seconds"] for r in served] == pytest.approx([r["seconds"] for r in made], abs=0.05)
    assert [r["cpu_seconds"] for r in served] == pytest.approx([r["cpu_seconds"] for r in made], abs=0.05)

    # Another setting is another key: 2 new tokens are generated, by the (restored) model.
    shutil.copy2(kept, weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    shorter = run_cli(*args[:-3], "--max-new-tokens", "2", "--no-progress", "--out", str(tmp_path / "shorter"))
    assert shorter.returncode == 0, shorter.stderr
    assert all(r["output"] == " a a" and not r.get("memo") for r in rows_of(tmp_path / "shorter"))

    # A changed model file (its modification time) misses, and so does --no-memo.
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = run_cli(*args, "--out", str(tmp_path / "touched"))
    assert touched.returncode == 0, touched.stderr
    assert [without_cost(r) for r in rows_of(tmp_path / "touched")] == [without_cost(r) for r in made]
    assert not any(r.get("memo") for r in rows_of(tmp_path / "touched"))
    off = run_cli(*args, "--no-memo", "--out", str(tmp_path / "off"))
    assert off.returncode == 0, off.stderr
    assert not any(r.get("memo") for r in rows_of(tmp_path / "off"))


def test_a_model_key_follows_its_files_and_settings(model_copy):
    cfg = ModelConfig(name=str(model_copy))
    key = model_key(cfg)
    assert key == model_key(cfg.model_copy(update={"weight": 3.0, "threads": 2}))  # a method's weight, cores
    assert key != model_key(cfg.model_copy(update={"dtype": "bfloat16"}))
    with open(model_copy / "config.json", "a") as f:  # one byte more in any file of the model
        f.write(" ")
    assert model_key(cfg) != key
    remote = ModelConfig(name="x", engine="vllm", url="http://127.0.0.1:1")
    assert model_key(remote) is None  # a served name and URL do not pin the weights


def test_sampling_is_never_kept():
    assert generation_key("m", "Q:", GenerationConfig(temperature=0.7, seed=1)) is None
    greedy = generation_key("m", "Q:", GenerationConfig())
    assert greedy is not None
    # a greedy generation does not depend on top_p, top_k or the seed; it does on the budget
    assert generation_key("m", "Q:", GenerationConfig(top_p=0.5, top_k=3, seed=7)) == greedy
    assert generation_key("m", "Q:", GenerationConfig(max_new_tokens=3)) != greedy
    assert generation_key("m", "Q:", GenerationConfig(stop=["\n"])) != greedy
    assert generation_key("m", "Q:", GenerationConfig(chat="raw")) != greedy


def test_a_sampled_single_run_is_not_kept(answer_models, tmp_path):
    data = answer_rows(tmp_path, 2)
    spec = EvalSpec(task="triviaqa", models=[ModelConfig(name=answer_models["right"])], data=str(data / "triviaqa" / "rows.jsonl"),
                    generation=GenerationConfig(temperature=0.7, seed=3, max_new_tokens=2))  # fmt: skip
    run_eval(spec, tmp_path / "one", data, {"max_new_tokens"}, show_progress=False)
    again = run_eval(spec, tmp_path / "two", data, {"max_new_tokens"}, show_progress=False)
    assert again.memo_rows == 0 and not any(r.memo for r in read_rows(tmp_path / "two" / "rows.jsonl"))


CHOICE_ROWS = [
    {"q": "first?", "options": ["yes", "no"], "answer": 1},
    {"q": "second?", "options": ["no", "yes", "maybe"], "answer": 0},
    {"q": "third?", "options": ["a red apple", "the sky", "blood"], "answer": 2},
]


def test_a_product_after_its_members_runs_is_read_from_the_memo_and_equals_one_without(tiny_dirs, tmp_path):
    dirs = [str(d) for d in list(tiny_dirs.values())[:2]]
    if len(dirs) < 2:
        pytest.skip("needs two tiny models")
    task = str(write_task(tmp_path, CHOICE_ROWS))
    models = [ModelConfig(name=d) for d in dirs]
    raw = GenerationConfig(chat="raw")

    def run(name: str, method: str, members: list[ModelConfig], memo: bool = True, **options):
        spec = EvalSpec(task=task, method=method, models=members, method_options=options, generation=raw)
        summary = run_eval(spec, tmp_path / name, explicit_generation={"chat"}, show_progress=False, memo=memo)
        return summary, rows_of(tmp_path / name)

    alone = [run(f"alone{i}", "single", [m])[1] for i, m in enumerate(models)]
    assert not any(r.get("memo") for rows in alone for r in rows)
    for method, options in [("product", {}), ("mixture", {"weights": [2.0, 1.0]})]:
        fused, rows = run(f"{method}-memo", method, models, **options)
        plain, fresh = run(f"{method}-plain", method, models, memo=False, **options)
        assert fused.memo_rows == 3 and all(r["memo"] for r in rows)
        assert plain.memo_rows == 0 and not any(r.get("memo") for r in fresh)
        # the same fused log-likelihoods, each member's own, and the same answers and metrics
        assert [without_cost(r) for r in rows] == [without_cost(r) for r in fresh]
        assert fused.metrics == plain.metrics
        # its cost: the members' scoring seconds as measured in their own runs, summed
        for j, row in enumerate(rows):
            assert row["seconds"] == pytest.approx(sum(a[j]["seconds"] for a in alone), abs=1e-3)
            assert row["cpu_seconds"] == pytest.approx(sum(a[j]["cpu_seconds"] for a in alone), abs=1e-3)
    # a member's own run again: read from the memo, as made
    again = run("alone0-again", "single", models[:1])[1]
    assert [without_cost(r) for r in again] == [without_cost(r) for r in alone[0]]


WRITER = """
import sys, time
from pathlib import Path
from fuselm.eval.memo import Memo
who, n, path = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
(path.parent / f"ready-{who}").touch()
while not (path.parent / "go").exists():  # both start writing at once
    time.sleep(0.01)
with Memo(path) as memo:
    for i in range(n):
        memo.put({f"{who}-{i}": {"who": who, "i": i, "pad": "x" * 200}})
        assert memo.get(f"{who}-{i}")["i"] == i
"""


def test_two_processes_writing_at_once_keep_every_entry(tmp_path):
    path = tmp_path / "memo.sqlite3"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, who, "300", str(path)], env=env, stderr=subprocess.PIPE)
        for who in ("a", "b")
    ]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready-{who}").exists() for who in "ab"):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "a writer did not start"
        time.sleep(0.05)
    (tmp_path / "go").touch()
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    with Memo(path) as memo:
        assert len(memo) == 600
        assert all(memo.get(f"{who}-{i}") == {"who": who, "i": i, "pad": "x" * 200}
                   for who in "ab" for i in range(300))  # fmt: skip
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_the_store_is_bounded_least_recently_used_first(tmp_path):
    path = tmp_path / "memo.sqlite3"
    entry = {"pad": "x" * 1000}
    with Memo(path, max_bytes=10_000) as memo:
        memo.put({f"old-{i}": entry for i in range(5)})
    with Memo(path, max_bytes=10_000) as memo:
        memo.put({f"new-{i}": entry for i in range(5)})
        assert memo.get("old-0") == entry  # used now: kept over the other old ones
    with Memo(path, max_bytes=10_000) as memo:
        memo.put({f"newer-{i}": entry for i in range(3)})
    with sqlite3.connect(path) as db:
        kept = {k for (k,) in db.execute("SELECT key FROM memo")}
    assert len(kept) <= 9 and {f"newer-{i}" for i in range(3)} <= kept and "old-0" in kept
    assert not {f"old-{i}" for i in range(1, 5)} & kept


def test_the_memo_lives_in_fuselms_cache_unless_moved(monkeypatch, tmp_path):
    monkeypatch.delenv("FUSELM_MEMO")
    monkeypatch.setenv("FUSELM_CACHE", str(tmp_path / "cache"))
    assert memo_path() == tmp_path / "cache" / "memo.sqlite3"
    monkeypatch.setenv("FUSELM_MEMO", str(tmp_path / "elsewhere.sqlite3"))
    assert memo_path() == tmp_path / "elsewhere.sqlite3"
