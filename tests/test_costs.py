"""What a row costs: wall seconds, and the process's CPU seconds where every model runs in
process, which calibration compares setups by (eval/records.py Stopwatch, calibrate.relative_cost)."""

from __future__ import annotations

import json
import time

import yaml

from fuselm.eval.calibrate import relative_cost
from fuselm.eval.records import EvalRow, EvalSummary, Stopwatch
from fuselm.eval.report import RunView, load_run

from .conftest import run_cli_here


def view(name: str, costs: list[tuple[float, float | None]]) -> RunView:
    rows = [EvalRow(id=i, metrics={"acc": 1.0}, seconds=s, cpu_seconds=c) for i, (s, c) in enumerate(costs)]
    return RunView(name, EvalSummary(task="t", method="m", models=[name], metrics={"acc": 1.0}, n=len(rows)), rows)


def test_a_stopwatch_counts_cpu_work_not_waiting():
    watch = Stopwatch(cpu=True)
    time.sleep(0.3)  # waiting: wall time, no CPU time
    end = time.process_time() + 0.2
    while time.process_time() < end:  # working: both
        pass
    assert watch.wall() >= 0.45 and 0.15 <= watch.cpu() < 0.35
    assert Stopwatch(cpu=False).cpu() is None


def test_relative_cost_compares_cpu_seconds_where_both_runs_have_them_else_wall_seconds():
    anchor = view("anchor", [(1.0, 1.0), (1.0, 1.0)])
    # the fused run's wall seconds inflated by another job's load; its CPU work twice the anchor's
    fused = view("fused", [(10.0, 2.0), (10.0, 2.0)])
    assert relative_cost(fused, anchor) == 2.0
    one_unknown = view("fused", [(10.0, 2.0), (10.0, None)])  # e.g. a memo entry kept no CPU time
    assert relative_cost(one_unknown, anchor) == 10.0


def test_an_in_process_run_records_each_rows_cpu_seconds(tiny_dirs, tmp_path):
    rows = [
        {"id": f"r{i}", "q": f"{i} plus one is", "options": [str(i + 1), str(i + 2)], "answer": 0} for i in range(3)
    ]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tmp_path / "t.yaml"
    task.write_text(yaml.safe_dump({
        "task": "t", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "t.jsonl"}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": "options", "doc_to_target": "answer",
    }))  # fmt: skip
    done = run_cli_here("eval", "--task", str(task), "--models", str(tiny_dirs["qwen2"]), "--no-memo", "--no-progress",
                        "--out", str(tmp_path / "run"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    run = load_run(tmp_path / "run")
    assert len(run.rows) == 3 and all(r.cpu_seconds is not None and r.cpu_seconds > 0 for r in run.rows)
    assert run.summary.cpu_seconds_per_sample == sum(r.cpu_seconds for r in run.rows) / 3


def qa_view(name: str, em: list[float], cpu: float) -> RunView:
    rows = [EvalRow(id=i, metrics={"em": e, "f1": e, "paper_match": e}, seconds=cpu, cpu_seconds=cpu)
            for i, e in enumerate(em)]  # fmt: skip
    mean = sum(em) / len(em)
    summary = EvalSummary(task="triviaqa", method="m", models=name.split("+"), n=len(rows), main_metric="em",
                          metrics={"em": mean, "f1": mean, "paper_match": mean})  # fmt: skip
    return RunView(name, summary, rows)


def test_a_member_alone_that_ranks_as_high_as_the_choice_for_less_is_chosen_instead():
    from fuselm.eval.calibrate import dominating_member
    from fuselm.eval.tasks import get_task

    task = get_task("triviaqa")
    hits = [1.0] * 5 + [0.0] * 5
    anchor = qa_view("a", [1.0] * 4 + [0.0] * 6, cpu=2.0)  # chosen on the first block; behind on all rows
    cheap = qa_view("b", hits, cpu=1.0)
    fused = qa_view("a+b", hits, cpu=3.0)
    alone = {"a": anchor, "b": cheap}
    assert dominating_member(task, fused, alone, anchor) == "b"  # as good, a third of the cost
    assert dominating_member(task, anchor, alone, anchor, exclude=["a"]) == "b"  # better and cheaper than the anchor
    dear = {"a": anchor, "b": qa_view("b", hits, cpu=4.0)}
    assert dominating_member(task, fused, dear, anchor) is None  # as good but dearer: the fused choice stands
    worse = {"a": anchor, "b": qa_view("b", [1.0] * 4 + [0.0] * 6, cpu=1.0)}
    assert dominating_member(task, fused, worse, anchor) is None  # cheaper but below it
