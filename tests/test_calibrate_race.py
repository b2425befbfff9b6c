"""The race run again: a calibration interrupted after its first looks, or done, is run again with
the same command and replays the looks from its runs (calibrate.ran_past, view_of_first)."""

from __future__ import annotations

import json

import yaml

from fuselm.calibration import load_calibration

from .conftest import run_cli_here


def test_a_finished_calibration_run_again_replays_its_race_and_chooses_the_same(tiny_dirs, tmp_path):
    rows = [
        {"id": f"r{i}", "q": f"{i} plus one is", "options": [str(i + 1), str(i + 7)], "answer": 0} for i in range(6)
    ]
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    task = tmp_path / "t.yaml"
    task.write_text(yaml.safe_dump({
        "task": "t", "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": "dev.jsonl", "test": "test.jsonl"}},
        "validation_split": "validation", "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{q}}",
        "doc_to_choice": "options", "doc_to_target": "answer",
    }))  # fmt: skip
    args = ["calibrate", "--task", str(task), "--models", f"{tiny_dirs['llama']},{tiny_dirs['qwen2']}",
            "--block-rows", "2", "--min-rows", "2", "--no-memo", "--no-progress", "--out", str(tmp_path / "c.yaml")]  # fmt: skip
    first = run_cli_here(*args)
    assert first.returncode == 0, first.stderr
    before = load_calibration(tmp_path / "c.yaml")
    assert before.looks == 3 and before.dev.limit == 6  # three looks, every row
    runs = sorted((tmp_path / "c.runs").glob("*/rows.jsonl"))
    lines = {p: p.read_text() for p in runs}
    again = run_cli_here(*args)  # the same command: the runs hold 6 rows, its first look asks for 2
    assert again.returncode == 0, again.stderr
    after = load_calibration(tmp_path / "c.yaml")
    assert (after.method, after.models, after.reason) == (before.method, before.models, before.reason)
    assert [t.score for t in after.tried] == [t.score for t in before.tried]
    assert {p: p.read_text() for p in runs} == lines  # nothing ran again
