"""Evaluation harness: metrics on hand-made cases, data errors, resumable runs, reports."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuselm.errors import FuselmError
from fuselm.eval import metrics as M
from fuselm.eval.task import load_rows
from fuselm.eval.tasks import get_task, task_names

from .conftest import SHARED_DATA, run_cli, run_cli_here

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")


def test_squad_metrics():
    assert M.squad_em("The Beatles.", ["beatles"]) == 1.0
    assert M.squad_em("Beatles band", ["beatles"]) == 0.0
    assert M.squad_f1("Beatles band", ["the beatles"]) == pytest.approx(2 / 3)
    assert M.squad_f1("", ["x"]) == 0.0


def test_lenient_qa_rules_and_distortions():
    assert M.lenient_qa("three dogs", ["3 dog"]) == 1.0  # number words and plurals
    assert M.lenient_qa("It was Paris, in France", ["Paris"]) == 1.0  # containment
    assert M.lenient_qa("Paris", ["Paris, France"]) == 1.0  # either direction
    assert M.lenient_qa("the", ["the"]) == 0.0  # only stop words: never a match
    assert M.lenient_qa("London", ["Paris"]) == 0.0


def test_gsm8k_metrics_and_distortion():
    assert M.gsm8k_reference("so 5+5=10\n#### 1,010") == "1010"
    # the AdaFuse data's format: the rationale's numbers come first, the answer last
    assert M.gsm8k_reference("It takes 2/2=1 bolt\nSo 2+1=3 bolts\nTherefore, the answer is 3") == "3"
    assert M.gsm8k_reference("He owes 10-25=-15\nTherefore, the answer is -15.") == "-15"
    assert M.gsm8k_extract("... The answer is \\boxed{42}.") == "42"
    assert M.gsm8k_extract("first 3 then 7.") == "7"
    assert M.gsm8k_exact("\\boxed{18}", "18") == 1.0
    assert M.gsm8k_exact("\\boxed{118}", "18") == 0.0
    assert M.lenient_gsm8k("\\boxed{118}", "18") == 1.0  # the documented distortion
    assert M.lenient_gsm8k("no number", "18") == 0.0


def test_chrf_counts_empty_outputs():
    chrf = M.corpus_chrf()
    full = chrf(["Hallo Welt", "gut"], ["Hallo Welt", "gut"])
    with_empty = chrf(["Hallo Welt", ""], ["Hallo Welt", "gut"])
    assert full > with_empty


def test_corpus_metric_interval_resamples_sentences():
    import sacrebleu

    chrf = M.corpus_chrf(extract=lambda o: o.strip().split("\n")[0])
    refs = ["Das Haus ist rot.", "Ich mag Katzen.", "Der Hund schläft.", "Es regnet heute.", "Wir gehen nach Hause."]
    outs = ["Das Haus ist rot.\nmore", "Ich liebe Hunde.", "Der Hund schläft.", "", "Wir gehen heim."]
    score = chrf(outs, refs)
    # the same score as sacrebleu's corpus chrF on the extracted outputs
    assert score == pytest.approx(sacrebleu.corpus_chrf([o.split("\n")[0] for o in outs], [refs]).score)
    lo, hi = chrf.interval(outs, refs)
    assert lo < score < hi and hi - lo > 10  # mixed sentences: a wide interval
    assert chrf.interval(outs, refs) == (lo, hi)  # seeded
    assert chrf.interval(refs, refs) == (pytest.approx(100.0), pytest.approx(100.0))
    assert chrf.interval([], []) is None


def test_humaneval_execution_limits():
    from fuselm.eval.tasks.humaneval import run_program

    task = get_task("humaneval")
    rows = load_rows(task, None)
    assert len(rows) == 164
    row = rows[0]
    assert task.metrics["pass@1"](row["canonical_solution"], "", row) == 1.0
    # the text a model should write (the controller's and the router's target): a passing body
    assert task.metrics["pass@1"](task.reference_text(row), "", row) == 1.0
    assert task.metrics["pass@1"]("    return None\n", "", row) == 0.0
    assert run_program("while True:\n    pass\n", timeout=1.0) is False
    assert run_program("x = bytearray(4 << 30)\n") is False  # over the memory limit


def _gone(pid: int, wait_s: float = 5.0) -> bool:
    """Whether process `pid` has ended (a zombie that init has not reaped yet has ended)."""
    end = time.time() + wait_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        if time.time() > end:
            return False
        time.sleep(0.05)


def test_the_sandbox_passes_on_nothing_of_the_parent_s_environment(monkeypatch):
    from fuselm.eval.sandbox import run_python

    monkeypatch.setenv("FUSELM_API_KEY", "fuselm-secret-1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-2")
    monkeypatch.setenv("PYTHONPATH", "/nowhere")
    program = (
        "import json, os, resource, sys\n"
        "limits = {n: resource.getrlimit(getattr(resource, 'RLIMIT_' + n)) for n in ('CPU', 'FSIZE', 'AS', 'CORE')}\n"
        "print(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd(), 'limits': limits, 'hash': hash('abc'),\n"
        "                  'user_site': sys.flags.no_user_site, 'safe_path': sys.flags.safe_path}))\n"
    )
    first = run_python(program)
    assert first.ok, first.stderr
    seen = json.loads(first.stdout)
    assert set(seen["env"]) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "PYTHONHASHSEED", "LC_CTYPE"}
    assert not any("secret" in v or "nowhere" in v for v in seen["env"].values())
    assert seen["env"]["HOME"] == seen["cwd"] and Path(seen["cwd"]).name.startswith("fuselm-sandbox-")
    assert not Path(seen["cwd"]).exists()  # removed afterwards
    assert seen["limits"] == {"CPU": [13, 14], "FSIZE": [1 << 20] * 2, "AS": [1 << 30] * 2, "CORE": [0, 0]}
    assert seen["user_site"] == 1 and seen["safe_path"] is True  # what -I gives
    assert json.loads(run_python(program).stdout)["hash"] == seen["hash"]  # PYTHONHASHSEED is honoured


def test_the_sandbox_kills_the_whole_process_group_at_the_time_limit():
    from fuselm.eval.sandbox import Limits, run_python

    forks = (
        "import os, time\npid = os.fork()\nif pid == 0:\n    time.sleep(60)\n    os._exit(0)\nprint(pid, flush=True)\n"
    )
    hung = run_python(forks + "time.sleep(60)\n", Limits(timeout_s=3))
    assert hung.timed_out and not hung.ok and hung.returncode is None
    assert _gone(int(hung.stdout)), "the grandchild outlived the time limit"
    # a program that ends leaving a process behind: that one is killed too, its result stands
    left = run_python(forks, Limits(timeout_s=3))
    assert left.ok and _gone(int(left.stdout)), "a process left behind outlived the program"
    spin = run_python("while True:\n    pass\n", Limits(timeout_s=1))
    assert spin.timed_out and not spin.ok


def test_the_sandbox_limits_file_size_and_output_and_leaves_nothing_behind():
    import tracemalloc

    from fuselm.eval.sandbox import OUTPUT_KEEP, run_python

    big = run_python("import os\nprint(os.getcwd(), flush=True)\nopen('big', 'wb').write(b'x' * (50 << 20))\n")
    assert not big.ok and big.returncode == 1 and b"File too large" in big.stderr
    assert not Path(big.stdout.decode().strip()).exists()
    tracemalloc.start()
    try:
        loud = run_python("import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(100):\n    sys.stdout.write(chunk)\n")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert loud.ok and not loud.timed_out
    assert len(loud.stdout) <= OUTPUT_KEEP + 64 and loud.dropped == (100 << 20) - OUTPUT_KEEP
    assert peak < 8 << 20, f"{peak} bytes allocated while reading 100 MiB of output"


def test_a_run_made_before_a_config_field_existed_is_still_the_same_run(tmp_path):
    """A field added to the config since (at its default) does not make an earlier run another
    one; a changed setting does."""
    from fuselm.eval.records import EvalSpec
    from fuselm.eval.rundir import prepare_run_dir

    spec = EvalSpec(task="nq", models=[{"name": "smollm2-135m"}], limit=4)
    prepare_run_dir(tmp_path, spec, "digest")
    cfg = tmp_path / "config.json"
    saved = json.loads(cfg.read_text())
    for m in saved["spec"]["models"]:
        m.pop("tokenizer")  # as written before `tokenizer:` was a model field
    cfg.write_text(json.dumps(saved))
    prepare_run_dir(tmp_path, spec, "digest")  # the same run: resumed
    with pytest.raises(FuselmError, match="differs in: models"):
        prepare_run_dir(
            tmp_path, EvalSpec(task="nq", models=[{"name": "smollm2-135m", "weight": 2}], limit=4), "digest"
        )


def test_a_run_is_not_resumed_with_a_controller_or_router_trained_again(tmp_path):
    """The option names the same path, but the file behind it changed: the rows so far were made
    with the other one, so resuming would mix two setups."""
    from fuselm.eval.records import EvalSpec
    from fuselm.eval.rundir import prepare_run_dir

    ctl = tmp_path / "ctl.json"
    ctl.write_text('{"weights": [1.0]}')
    router = tmp_path / "router"
    (router / "sub").mkdir(parents=True)
    (router / "config.json").write_text("{}")
    (router / "sub" / "w.bin").write_bytes(b"\x00" * 8)

    def spec(**options):
        return EvalSpec(task="nq", method="adafuse", models=[{"name": "smollm2-135m"}], limit=4, method_options=options)

    run = tmp_path / "run"
    prepare_run_dir(run, spec(controller=str(ctl)), "digest")
    prepare_run_dir(run, spec(controller=str(ctl)), "digest")  # unchanged: resumed
    ctl.write_text('{"weights": [2.0]}')
    with pytest.raises(FuselmError, match="made with another controller"):
        prepare_run_dir(run, spec(controller=str(ctl)), "digest")
    other = tmp_path / "run2"
    prepare_run_dir(other, spec(router=str(router)), "digest")
    (router / "sub" / "w.bin").write_bytes(b"\x01" * 8)  # a training checkpoint's state: not read
    prepare_run_dir(other, spec(router=str(router)), "digest")
    (router / "config.json").write_text('{"trained": "again"}')
    with pytest.raises(FuselmError, match="made with another router"):
        prepare_run_dir(other, spec(router=str(router)), "digest")


def test_set_aside_refuses_a_run_directory_that_a_live_run_holds(tmp_path):
    """calibrate and research/never_worse_matrix.py move a run of another setup aside; a run still
    working in it (or in the place it would go to) keeps it: refused, nothing moved."""
    from fuselm.eval.rundir import set_aside

    from .support import locker as _locker

    out = tmp_path / "single-a"
    out.mkdir()
    (out / "rows.jsonl").write_text('{"id": 0}\n')
    aside = tmp_path / "single-a.superseded"
    for held in (out, aside):
        held.mkdir(exist_ok=True)
        holder = _locker(held, "-", 600)
        try:
            assert holder.stdout.readline() == "ready\n" and holder.stdout.readline().startswith("held")
            with pytest.raises(FuselmError) as e:
                set_aside(out)
            assert f"{held} is in use by another fuselm eval (pid {holder.pid})" in str(e.value)
            assert len(str(e.value).splitlines()) == 1
            assert (out / "rows.jsonl").read_text() == '{"id": 0}\n' and not (aside / "rows.jsonl").exists()
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
    # once nobody holds them: moved, and no lock file travels with it
    assert set_aside(out) == aside
    assert not out.exists() and (aside / "rows.jsonl").read_text() == '{"id": 0}\n'
    assert not (aside / ".lock").exists()


def test_bad_data_is_named_by_file_and_line(tmp_path):
    task = get_task("nq")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": ["a"]}\n{not json}\n')
    with pytest.raises(FuselmError, match=r"bad.jsonl:2: malformed JSON"):
        load_rows(task, str(bad))
    bad.write_text('{"question": "q", "answer": ["a"]}\n\n{"question": "q2"}\n')
    with pytest.raises(FuselmError, match=r"bad.jsonl:3: missing field\(s\) answer"):
        load_rows(task, str(bad))


def test_unknown_task_did_you_mean():
    proc = run_cli_here("eval", "--task", "gsm8", "--model", "x", "--out", "/tmp/never")
    assert proc.returncode == 1 and "did you mean 'gsm8k'" in proc.stderr.lower()


@needs_data
def test_every_task_loads_its_data_and_builds_prompts():
    for name in task_names():
        task = get_task(name)
        rows = load_rows(task, None, SHARED_DATA)
        prompt = task.build_prompt(task.prompt_prefix(SHARED_DATA), rows[0])
        assert prompt and (task.prompt_file is None or prompt.startswith(task.prompt_prefix(SHARED_DATA)[:40]))


# Enough rows that the kill, sent once two are on disk, cannot lose the race to the run's end: with
# six, a fast CI machine wrote all of them within one 50 ms poll.
N_KILL_ROWS = 40


def _eval_args(model_dir, data, out, limit=N_KILL_ROWS):
    # --no-memo: each run does its work; the memo would answer the second run at once, finishing
    # it before it can be killed
    return [
        "eval",
        "--task",
        "nq",
        "--model",
        str(model_dir),
        "--raw",
        "--data",
        str(data),
        "--data-dir",
        str(SHARED_DATA),
        "--limit",
        str(limit),
        "--max-new-tokens",
        "8",
        "--no-progress",
        "--no-memo",
        "--out",
        str(out),
    ]


@pytest.fixture
def nq_sample(tmp_path):
    rows = [json.loads(x) for x in (SHARED_DATA / "nq" / "test_0-999.jsonl").read_text().splitlines()[:N_KILL_ROWS]]
    path = tmp_path / "nq.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@needs_data
def test_resume_after_kill_gives_the_same_rows(tiny_dirs, nq_sample, tmp_path):
    model = tiny_dirs.get("llama") or next(iter(tiny_dirs.values()))
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    ref = run_cli(*_eval_args(model, nq_sample, ref_out))
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "fuselm.cli", *_eval_args(model, nq_sample, out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rows_file = out / "rows.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not rows_file.exists() or rows_file.read_text().count("\n") < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = rows_file.read_text().count("\n")
    assert 2 <= n_before < N_KILL_ROWS
    partial = run_cli("report", str(out))  # an interrupted run reports its rows so far
    assert partial.returncode == 0, partial.stderr
    assert f"{n_before} (partial)" in partial.stdout
    with open(rows_file, "a") as f:  # a torn line, as a crash in the middle of a write leaves
        f.write('{"id": 99, "out')
    again = run_cli(*_eval_args(model, nq_sample, out))
    assert again.returncode == 0, again.stderr

    def key(path):
        return [
            (r["id"], r["output"], r["metrics"])
            for r in map(json.loads, (path / "rows.jsonl").read_text().splitlines())
        ]

    assert key(out) == key(ref_out)
    assert (
        json.loads((out / "summary.json").read_text())["metrics"]
        == json.loads((ref_out / "summary.json").read_text())["metrics"]
    )
    # a different config is refused instead of mixing rows
    other = run_cli_here(*_eval_args(model, nq_sample, out)[:-2], "--temperature", "0.5", "--out", str(out))
    assert other.returncode == 1 and "different config" in other.stderr


@needs_data
def test_a_second_run_on_the_same_directory_is_refused(tiny_dirs, tmp_path):
    model = tiny_dirs.get("llama") or next(iter(tiny_dirs.values()))
    lines = (SHARED_DATA / "nq" / "test_0-999.jsonl").read_text().splitlines()[:120]
    data = tmp_path / "nq120.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    # Long enough (about a minute) that the first run is still going when the second one,
    # which takes seconds to start, reaches the lock.
    args = [*_eval_args(model, data, out, limit=120), "--max-new-tokens", "24"]
    first = subprocess.Popen(
        [sys.executable, "-m", "fuselm.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "rows.jsonl").exists():
            time.sleep(0.05)
        second = run_cli(*args)
        still_running = first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)  # leaves its lock behind, as a crash would
        first.wait()
    assert still_running, "the first run ended before the second started"
    assert second.returncode == 1 and f"in use by another fuselm eval (pid {first.pid})" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert (out / ".lock").read_text().strip() == str(first.pid)
    # The lock of the killed run is taken over; the run goes on and leaves each row once.
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert [json.loads(r)["id"] for r in (out / "rows.jsonl").read_text().splitlines()] == list(range(120))
    assert not (out / ".lock").exists()


@needs_data
def test_a_larger_limit_extends_a_run(tiny_dirs, nq_sample, tmp_path):
    model = tiny_dirs.get("llama") or next(iter(tiny_dirs.values()))
    out = tmp_path / "run"
    first = run_cli(*_eval_args(model, nq_sample, out, limit=2))
    assert first.returncode == 0, first.stderr
    kept = (out / "rows.jsonl").read_text().splitlines()
    more = run_cli(*_eval_args(model, nq_sample, out, limit=4))
    assert more.returncode == 0, more.stderr
    rows = (out / "rows.jsonl").read_text().splitlines()
    assert rows[:2] == kept and [json.loads(r)["id"] for r in rows] == [0, 1, 2, 3]  # kept, not re-run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 4 and summary["complete"]
    assert json.loads((out / "config.json").read_text())["spec"]["limit"] == 4
    # A smaller limit, or other rows (another offset), would mix runs: refused.
    fewer = run_cli_here(*_eval_args(model, nq_sample, out, limit=3))
    assert fewer.returncode == 1 and "different config" in fewer.stderr
    shifted = run_cli_here(*_eval_args(model, nq_sample, out, limit=5), "--offset", "1")
    assert shifted.returncode == 1 and "different config" in shifted.stderr


@needs_data
def test_eval_and_report_end_to_end(tiny_dirs, nq_sample, tmp_path):
    dirs = list(tiny_dirs.values())
    a = run_cli(*_eval_args(dirs[0], nq_sample, tmp_path / "a", limit=3))
    assert a.returncode == 0, a.stderr
    summary = json.loads(a.stdout)
    assert summary["n"] == 3 and set(summary["metrics"]) == {"em", "f1", "paper_match"}
    row = json.loads((tmp_path / "a" / "rows.jsonl").read_text().splitlines()[0])
    assert {
        "id",
        "prompt",
        "output",
        "answer",
        "reference",
        "metrics",
        "seconds",
        "new_tokens",
        "forward_passes",
        "text_share",
    } <= set(row)
    b_args = _eval_args(dirs[0], nq_sample, tmp_path / "b", limit=3)
    if len(dirs) > 1:
        b_args[4] = f"{dirs[0]},{dirs[1]}"
        b_args += ["--method", "adafuse"]
    assert run_cli(*b_args).returncode == 0
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    rep = run_cli("report", str(tmp_path / "a"), str(tmp_path / "b"), "--md", str(md), "--plot", str(png))
    assert rep.returncode == 0, rep.stderr
    text = md.read_text()
    assert text.count("| a |") == 1 and text.count("| b |") == 1  # one line per run
    header = next(line for line in text.splitlines() if line.startswith("| run |"))
    assert [c.strip() for c in header.strip("|").split("|")][3:6] == ["em", "f1", "paper_match"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_task_generation_defaults_and_overrides():
    from fuselm.config import GenerationConfig
    from fuselm.eval.runner import task_generation

    nq = get_task("nq")
    gen = task_generation(nq, GenerationConfig(stop=["###"]), explicit=set())
    assert gen.chat == "raw" and gen.max_new_tokens == nq.max_new_tokens
    assert gen.stop == ["\n", "###"]
    chosen = task_generation(nq, GenerationConfig(chat="chat", max_new_tokens=5), explicit={"chat", "max_new_tokens"})
    assert chosen.chat == "chat" and chosen.max_new_tokens == 5
    assert task_generation(get_task("flores-en-de"), GenerationConfig(), set()).chat == "auto"


def test_report_overview_puts_each_setup_against_each_task():
    from fuselm.eval.report import ReportLine, overview, to_markdown

    def row(task, method, models, metric, mean, main, partial=False, corpus=False):
        return ReportLine(
            run=f"{task}-{method}",
            task=task,
            method=method,
            models=models,
            metric=metric,
            main=main,
            corpus=corpus,
            mean=mean,
            ci_low=30.0 if corpus else 0.0,
            ci_high=50.0 if corpus else 1.0,
            versus={},
            n=10,
            partial=partial,
            seconds_per_sample=1.0,
        )

    rows = [
        row("nq", "single", "a", "em", 0.25, True),
        row("nq", "single", "a", "f1", 0.5, False),
        row("nq", "adafuse", "a+b", "em", 0.125, True, partial=True),
        row("flores-en-de", "single", "a", "chrf", 41.5, True, corpus=True),
    ]
    header, body = overview(rows)
    assert header == ["method", "models", "nq em", "flores-en-de chrf"]
    assert body == [["single", "a", "25.0", "41.5"], ["adafuse", "a+b", "12.5*", ""]]
    md = to_markdown(rows)
    assert md.index("main metric by task") < md.index("### nq") < md.index("### flores-en-de")
    # per-sample metrics in %, corpus metrics on their own scale, each with its interval
    assert "| 25.0 [0.0, 100.0] |" in md and "| 41.5 [30.0, 50.0] |" in md


def test_gsm8k_reference_text_follows_the_shots_format():
    task = get_task("gsm8k")
    shared_format = {"question": "q", "answer": "It takes 2/2=1 bolt\nSo 2+1=3 bolts\nTherefore, the answer is 3"}
    text = task.reference_text(shared_format)
    assert text == "Let's think step by step\nIt takes 2/2=1 bolt\nSo 2+1=3 bolts\nThe answer is \\boxed{3}\n"
    original_format = {"question": "q", "answer": "5+5=10\n#### 10"}
    assert task.reference_text(original_format).endswith("5+5=10\nThe answer is \\boxed{10}\n")


def test_plot_names_each_setup_once_across_tasks(tmp_path):
    from fuselm.eval.report import RunView, _setup_labels, plot_quality_cost

    def run(task, method, models, em, complete=True):
        summary = {"task": task, "method": method, "models": models, "main_metric": "em", "complete": complete,
                   "metrics": {"em": em}, "seconds_per_sample": 1.5}  # fmt: skip
        return RunView(f"{task}-{method}", summary, [{"id": 0, "metrics": {"em": em}}])

    runs = [
        run("nq", "single", ["a"], 0.2),
        run("nq", "adafuse", ["a", "b"], 0.3),
        run("squad", "adafuse", ["a", "c"], 0.4, complete=False),
        run("squad", "unite", ["a", "b"], 0.1),
    ]
    labels = _setup_labels(runs)
    # a setup is the model alone, or the method, with its models only where they differ between runs
    assert [labels[id(r)] for r in runs] == ["a", "adafuse (a+b)", "adafuse (a+c)", "unite"]
    png = tmp_path / "p.png"
    plot_quality_cost(runs, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_corpus_metrics_of_a_partial_run_score_its_rows_against_their_references():
    from fuselm.eval.runner import EvalRow, EvalSpec, summarize

    task = get_task("flores-en-de")
    spec = EvalSpec(task="flores-en-de", method="single", models=[{"name": "smollm2-135m"}])
    done = [
        {"id": 0, "output": "Das ist ein Haus.", "answer": "Das ist ein Haus.", "reference": "Das ist ein Haus."},
        {"id": 1, "output": "Ich mag Katzen.", "answer": "Ich mag Katzen.", "reference": "Ich liebe Hunde sehr."},
    ]
    for r in done:
        r.update(metrics={}, seconds=1.0, new_tokens=5)
    selected = [{"id": 0}, {"id": 1}, {"id": 2}]  # the third row is not done yet
    summary = summarize(task, spec, [EvalRow.model_validate(r) for r in done], selected)
    assert not summary.complete and summary.n == 2
    expected = M.corpus_chrf()([r["output"] for r in done], [r["reference"] for r in done])
    assert summary.metrics["chrf"] == pytest.approx(expected) and expected < 100.0


def _view(task, method, models, rows, main):
    from fuselm.eval.report import RunView

    summary = {"task": task, "method": method, "models": models, "main_metric": main, "n": len(rows)}
    summary.update(seconds_per_sample=1.0, metrics={})
    return RunView(f"{task}-{method}-{'+'.join(models)}", summary, rows)


def test_paired_difference_cancels_what_two_runs_share():
    from fuselm.eval.report import by_task, interval, paired_difference, report_rows

    # per-sample: the fused run is right wherever the model is, and on 5 more of 40 rows
    base = [{"id": i, "metrics": {"em": float(i % 2)}} for i in range(40)]
    fused = [{"id": i, "metrics": {"em": float(i % 2 or i < 10)}} for i in reversed(range(40))]  # any row order
    a, b = _view("nq", "unite", ["m", "n"], fused, "em"), _view("nq", "single", ["m"], base, "em")
    a.summary.metrics, b.summary.metrics = {"em": 25 / 40}, {"em": 0.5}
    delta, lo, hi = paired_difference(a, b, "em")
    assert delta == pytest.approx(5 / 40) and 0 < lo < delta < hi
    # the separate intervals overlap, the paired one is clear of zero
    assert interval(a, "em")[0] < interval(b, "em")[1]
    assert paired_difference(b, b, "em") == (0.0, 0.0, 0.0)
    rows = report_rows([a, b], baselines=["m"])
    assert rows[0].versus["m"] == (delta, lo, hi) and rows[1].versus == {}
    header, body = by_task(rows)["nq"]
    col = header.index("em - m")
    assert body[0][col] == f"+12.5 [+{lo * 100:.1f}, +{hi * 100:.1f}]" and body[1][col] == ""

    # corpus metric: resampled sentences rescored for both runs; identical outputs differ by 0
    refs = ["Das Haus ist rot.", "Ich mag Katzen.", "Der Hund schläft.", "Es regnet heute."]
    good = [{"id": i, "output": r, "reference": r, "metrics": {}} for i, r in enumerate(refs)]
    poor = [dict(r, output=r["output"].split()[0]) for r in good]
    g, p = (
        _view("flores-en-de", "unite", ["m", "n"], good, "chrf"),
        _view("flores-en-de", "single", ["m"], poor, "chrf"),
    )
    delta, lo, hi = paired_difference(g, p, "chrf")
    assert delta > 30 and 0 < lo <= hi
    assert paired_difference(p, p, "chrf") == (0.0, 0.0, 0.0)
    assert paired_difference(g, _view("flores-en-de", "single", ["m"], [], "chrf"), "chrf") is None


def test_report_baseline_is_a_model_or_a_method():
    from fuselm.errors import FuselmError
    from fuselm.eval.report import report_rows

    def run(method, models, right):  # right: the ids of the 20 rows this run gets right
        rows = [{"id": i, "metrics": {"em": float(i in right)}} for i in range(20)]
        view = _view("nq", method, models, rows, "em")
        view.summary.metrics = {"em": len(right) / 20}
        return view

    single = run("single", ["m"], range(4))
    average = run("token-average", ["m", "n"], range(6))
    routed = run("fusionroute", ["m", "n"], range(1, 9))
    rows = report_rows([single, average, routed], baselines=["m", "token-average"])
    by_run = {r.run: r.versus for r in rows}
    assert by_run[routed.name]["m"][0] == pytest.approx(4 / 20)
    assert by_run[routed.name]["token-average"][0] == pytest.approx(2 / 20)
    assert by_run[single.name]["token-average"][0] == pytest.approx(-2 / 20)
    assert "token-average" not in by_run[average.name]  # not against itself

    with pytest.raises(FuselmError, match="Did you mean 'token-average'"):
        report_rows([single, average], baselines=["token-averge"])
    other = run("token-average", ["m", "k"], range(3))
    other.name = "nq-token-average-2"
    with pytest.raises(FuselmError, match="ambiguous on nq"):
        report_rows([single, average, other], baselines=["token-average"])
