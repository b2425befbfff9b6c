"""fuselm as an lm-evaluation-harness model (fuselm/eval/harness.py): lm-eval's Python API and its
command line (`fuselm lm-eval`, a real subprocess) run a fused setup and get what `fuselm eval`
gets on the same rows and prompts; task files read local JSON, never a hub."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from fuselm.errors import FuselmError  # noqa: E402
from fuselm.eval.choice import fuse  # noqa: E402
from fuselm.eval.harness import FuselmLM  # noqa: E402
from fuselm.eval.rundir import read_rows  # noqa: E402
from fuselm.models.loading import load_model  # noqa: E402

from .conftest import requires_bundled, run_cli, run_cli_here  # noqa: E402

PAIR = ["smollm2-135m", "qwen2.5-coder-0.5b"]
QA_ROWS = [
    {"id": "q0", "question": "What is the capital of France?", "answer": "Paris"},
    {"id": "q1", "question": "How many legs does a spider have?", "answer": "eight"},
    {"id": "q2", "question": "What colour is the sky on a clear day?", "answer": "blue"},
]
MC_ROWS = [
    {"id": "m0", "q": "The capital of France is", "options": ["Paris", "Rome", "a fish"], "answer": 0},
    {"id": "m1", "q": "Two plus two is", "options": ["five", "four"], "answer": 1},
    {"id": "m2", "q": "Ice is", "options": ["cold", "hot", "loud", "green"], "answer": 0},
]


def write_task(directory: Path, name: str, rows: list[dict], **spec) -> Path:
    """A task file and its data in `directory`; lm-eval reads `data_files` relative to the
    directory it runs in, fuselm relative to the file: the tests run lm-eval in `directory`."""
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    body = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": f"{name}.jsonl"}},
        "test_split": "test",
        **spec,
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def generation_task(directory: Path) -> Path:
    return write_task(
        directory,
        "toy_qa",
        QA_ROWS,
        doc_to_text="Question: {{question}}\nAnswer:",
        doc_to_target="answer",
        generation_kwargs={"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
        metric_list=[{"metric": "exact_match", "ignore_case": True}],
    )


def choice_task(directory: Path) -> Path:
    return write_task(
        directory,
        "toy_mc",
        MC_ROWS,
        output_type="multiple_choice",
        doc_to_text="{{q}}",
        doc_to_choice="options",
        doc_to_target="answer",
        metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}],
    )


def simple_evaluate(lm: FuselmLM, task: Path, **kwargs) -> dict:
    import lm_eval

    with contextlib.chdir(task.parent):
        return lm_eval.simple_evaluate(
            model=lm, tasks=[task.stem], task_manager=TaskManager(include_path=str(task.parent)), log_samples=True,
            **kwargs,
        )  # fmt: skip


def fuselm_rows(task: Path, models: list[str], method: str, out: Path) -> dict[str, object]:
    """`fuselm eval` on the task file: rows by id."""
    done = run_cli_here("eval", "--task", str(task), "--models", ",".join(models), "--method", method,
                        "--out", str(out), "--no-progress")  # fmt: skip
    assert done.returncode == 0, done.stderr
    return {r.id: r for r in read_rows(out / "rows.jsonl")}


def by_row(samples: list[dict], rows: list[dict]) -> dict[str, dict]:
    return {rows[s["doc_id"]]["id"]: s for s in samples}


# --- generation: the fusion loop ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fused_generation(tmp_path_factory):
    """One task file, and `fuselm eval`'s adafuse rows on it with the default pair."""
    directory = tmp_path_factory.mktemp("lm-eval-gen")
    task = generation_task(directory)
    rows = fuselm_rows(task, PAIR, "adafuse", directory / "run")
    return task, rows


@requires_bundled("smollm2-135m")
@requires_bundled("qwen2.5-coder-0.5b")
def test_lm_evals_python_api_generates_what_fuselm_eval_generates(fused_generation):
    task, rows = fused_generation
    lm = FuselmLM(models="+".join(PAIR), method="adafuse", progress=False)
    try:
        results = simple_evaluate(lm, task)
    finally:
        lm.close()
    samples = by_row(results["samples"][task.stem], QA_ROWS)
    assert set(samples) == set(rows) == {"q0", "q1", "q2"}
    for rid, row in rows.items():
        assert samples[rid]["arguments"][0][0] == row.prompt  # the same prompt ...
        assert samples[rid]["resps"][0][0] == row.output  # ... the same generation
    assert any(row.output.strip() for row in rows.values())  # something was generated
    em = sum(row.metrics["exact_match"] for row in rows.values()) / 3
    assert results["results"][task.stem]["exact_match,none"] == pytest.approx(em)


@requires_bundled("smollm2-135m")
@requires_bundled("qwen2.5-coder-0.5b")
def test_lm_eval_command_line_runs_a_fused_config_as_fuselm_eval_does(fused_generation, tmp_path):
    task, rows = fused_generation
    config = tmp_path / "fuse.yaml"
    config.write_text(yaml.safe_dump({"models": PAIR, "method": "adafuse"}))
    out = tmp_path / "out"
    done = run_cli(
        "lm-eval", "--model", "fuselm", "--model_args", f"config={config},progress=false", "--tasks", task.stem,
        "--include_path", ".", "--output_path", str(out), "--log_samples", cwd=task.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (samples_file,) = out.rglob(f"samples_{task.stem}_*.jsonl")
    samples = by_row([json.loads(line) for line in samples_file.read_text().splitlines()], QA_ROWS)
    assert {rid: s["resps"][0][0] for rid, s in samples.items()} == {rid: r.output for rid, r in rows.items()}
    assert "|toy_qa" in done.stdout and "exact_match" in done.stdout  # lm-eval's own table


# --- log-likelihoods: the fused rule ----------------------------------------------------------------


def test_multiple_choice_through_lm_eval_scores_every_choice_as_fuselm_eval(tiny_dirs, tmp_path):
    models = [str(tiny_dirs["llama"]), str(tiny_dirs["qwen2"])]
    task = choice_task(tmp_path)
    rows = fuselm_rows(task, models, "mixture", tmp_path / "run")
    lm = FuselmLM(models="+".join(models), method="mixture", progress=False)
    try:
        results = simple_evaluate(lm, task)
    finally:
        lm.close()
    samples = by_row(results["samples"][task.stem], MC_ROWS)
    for rid, row in rows.items():
        ours = [c["logprob"] for c in row.choices]
        theirs = [r[0][0] for r in samples[rid]["resps"]]
        assert theirs == pytest.approx(ours, abs=1e-5)
        assert samples[rid]["acc"] == row.metrics["acc"] and samples[rid]["acc_norm"] == row.metrics["acc_norm"]


def _instance(kind: str, args: tuple, idx: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=idx)


def test_loglikelihood_fuses_each_members_own_string_logprob(tiny_dirs):
    models = [str(tiny_dirs["llama"]), str(tiny_dirs["gemma3"])]
    lm = FuselmLM(models="+".join(models), method="adafuse", choice_method="product", progress=False)
    try:
        requests = [_instance("loglikelihood", ("The sky is", c), i) for i, c in enumerate([" blue", " green"])]
        requests.append(_instance("loglikelihood", ("Water is", " wet"), 2))
        got = lm.loglikelihood(requests)
    finally:
        lm.close()
    for (context, continuation), (value, greedy) in zip([r.args for r in requests], got):
        own = []
        for directory in models:  # each member alone, loaded afresh: its own string log-prob
            model = load_model(directory)
            session = model.session(context)
            own.append(session.score([continuation])[0].logprob)
            session.close(), model.close()
        assert value == pytest.approx(fuse(own, [1.0, 1.0], "product"), abs=1e-5)
        assert greedy is False


def test_rolling_loglikelihood_scores_a_whole_text_after_each_members_start_of_text(tiny_dirs):
    # The gemma tokenizer adds a BOS (a text is scored after it); the qwen one has none (after
    # its end-of-text token, which its tokenizer reads back from the token's text).
    models = [str(tiny_dirs["gemma3"]), str(tiny_dirs["qwen2"])]
    text = "The quick brown fox jumps over the lazy dog."
    lm = FuselmLM(models="+".join(models), method="mixture", progress=False)
    try:
        (value,) = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))])
    finally:
        lm.close()
    own = []
    for directory in models:
        model = load_model(directory)
        info = model.info
        start = ""
        if info.bos_token_id is None:  # an end-of-text token read back as itself, not as its characters
            (start,) = [
                t for t in (model.decode([e]) for e in sorted(info.eos_token_ids)) if len(model.tokenize(t)) == 1
            ][:1]
            assert model.tokenize(start)[0] in info.eos_token_ids
        session = model.session(start)
        score = session.score([text])[0]
        assert score.n_tokens == len(model.tokenize(start + text)) - len(
            model.tokenize(start)
        )  # every token of the text
        own.append(score.logprob)
        session.close(), model.close()
    assert value == pytest.approx(fuse(own, [1.0, 1.0], "mixture"), abs=1e-5)


# --- refusals, before any model loads where they can ----------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        ({}, "model_args name no model"),
        ({"models": "smollm2-135m+qwen2.5-coder-0.5b", "method": "nonsense"}, "nonsense"),
        ({"models": "smollm2-135m+qwen2.5-coder-0.5b", "choice_method": "single"}, "choice_method='single'"),
        ({"models": "smollm2-135m", "concurrency": 2}, "needs every model on an engine"),
    ],
)
def test_bad_model_args_are_refused_with_one_line(args, message):
    with pytest.raises(FuselmError, match=message):
        FuselmLM(**args)


def test_a_scoring_method_refuses_generation_and_unknown_generation_settings(tiny_dirs):
    lm = FuselmLM(models=f"{tiny_dirs['llama']}+{tiny_dirs['qwen2']}", method="product", progress=False)
    try:
        with pytest.raises(FuselmError, match="generates nothing"):
            lm.generate_until([_instance("generate_until", ("Hi", {"until": ["\n"]}))])
        with pytest.raises(FuselmError, match="generation_kwargs num_beams"):
            lm.generation("Hi", {"until": ["\n"], "num_beams": 4})
    finally:
        lm.close()


def test_fuselm_lm_eval_passes_its_arguments_to_lm_evals_command_line():
    done = run_cli_here("lm-eval", "--help")
    assert done.returncode == 0 and "Language Model Evaluation Harness" in done.stdout  # lm-eval's own help
    listed = run_cli_here("--help")
    assert "lm-eval" in listed.stdout


# --- lm-eval's tasks run by lm-eval itself: `--task lm-eval:FILE.yaml` ----------------------------


def split_task(directory: Path, name: str, test: list[dict], validation: list[dict], **spec) -> Path:
    """A task file with a test and a validation split."""
    path = write_task(directory, name, test, **spec)
    (directory / f"{name}-dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in validation))
    body = yaml.safe_load(path.read_text())
    body["dataset_kwargs"]["data_files"]["validation"] = f"{name}-dev.jsonl"
    body["validation_split"] = "validation"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def test_fuselm_eval_of_an_lm_eval_task_scores_as_fuselms_own_reading_of_the_file(tiny_dirs, tmp_path):
    # One file, two readers: fuselm's (--task FILE) and lm-eval's (--task lm-eval:FILE), run from
    # another directory (the data files are read beside the file by both).
    models = [str(tiny_dirs["llama"]), str(tiny_dirs["qwen2"])]
    task = choice_task(tmp_path)
    ours = fuselm_rows(task, models, "product", tmp_path / "own")
    theirs = fuselm_rows(Path(f"lm-eval:{task}"), models, "product", tmp_path / "lm-eval")
    assert list(theirs) == list(ours) == ["m0", "m1", "m2"]  # the documents' own ids, in order
    for rid in ours:
        assert [c["logprob"] for c in theirs[rid].choices] == pytest.approx([c["logprob"] for c in ours[rid].choices])
        assert theirs[rid].metrics == ours[rid].metrics and theirs[rid].prompt == ours[rid].prompt
    summary = json.loads((tmp_path / "lm-eval" / "summary.json").read_text())
    assert summary["task"] == f"lm-eval:{task}" and summary["main_metric"] == "acc"


def test_an_lm_eval_task_with_what_fuselm_cannot_read_is_refused_with_one_line(tmp_path):
    task = write_task(
        tmp_path, "toy_bleu", QA_ROWS, doc_to_text="{{question}}", doc_to_target="answer",
        metric_list=[{"metric": "bleu"}],
    )  # fmt: skip
    done = run_cli_here("eval", "--task", f"lm-eval:{task}", "--models", "smollm2-135m", "--out", str(tmp_path / "r"))
    assert done.returncode == 1 and "bleu aggregate over the corpus" in done.stderr
    done = run_cli_here("eval", "--task", "lm-eval:" + str(tmp_path / "missing.yaml"), "--models", "smollm2-135m",
                        "--out", str(tmp_path / "r"))  # fmt: skip
    assert done.returncode == 1 and "no such task file" in done.stderr


def test_calibrating_on_an_lm_eval_task_writes_a_calibration_that_eval_and_serve_accept(tiny_dirs, tmp_path):
    from fuselm.calibration import load_calibration
    from fuselm.serve.config import ServeConfig

    models = [str(tiny_dirs["llama"]), str(tiny_dirs["qwen2"])]
    dev = [{"id": f"d{i}", "question": f"What is {i} plus one?", "answer": str(i + 1)} for i in range(6)]
    task = split_task(
        tmp_path, "toy_gen", QA_ROWS, dev, doc_to_text="Question: {{question}}\nAnswer:", doc_to_target="answer",
        generation_kwargs={"until": ["\n"], "max_gen_toks": 3}, metric_list=[{"metric": "exact_match"}],
    )  # fmt: skip
    out = tmp_path / "cal.yaml"
    done = run_cli_here("calibrate", "--task", f"lm-eval:{task}", "--models", ",".join(models), "--block-rows", "3",
                        "--min-rows", "3", "--out", str(out), "--no-progress")  # fmt: skip
    assert done.returncode == 0, done.stderr
    cal = load_calibration(out)
    assert cal.task == f"lm-eval:{task}" and cal.dev.ids == [r["id"] for r in dev]  # the validation split's rows
    assert len(cal.scores) == 2 and all(m.score is not None for m in cal.scores)  # each member alone
    assert all(m.nll is None for m in cal.scores)  # lm-eval builds the prompts: no reference NLLs
    assert cal.tried and {t.method for t in cal.tried} <= {"adafuse", "unite", "fixed-span", "token-average"}
    evaluated = run_cli_here("eval", "--task", f"lm-eval:{task}", "--calibration", str(out), "--out",
                             str(tmp_path / "test"), "--no-progress")  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["n"] == len(QA_ROWS)  # the test split, no dev row
    served = ServeConfig.model_validate({"setups": [{"id": "calibrated", "calibration": str(out)}]})
    assert served.setups[0].method == cal.method and [m.name for m in served.setups[0].models] == cal.models


def test_lm_evals_requests_reuse_the_members_scores_of_a_fuselm_run_from_the_memo(tiny_dirs, tmp_path):
    # The members alone on fuselm's own reading of the file keep their scores of " " + choice;
    # lm-eval asks for "" + " choice": the same string, one memo key (eval/memo.py).
    models = [str(tiny_dirs["llama"]), str(tiny_dirs["qwen2"])]
    task = choice_task(tmp_path)
    for i, m in enumerate(models):
        fuselm_rows(task, [m], "single", tmp_path / f"alone{i}")
    lm = FuselmLM(models="+".join(models), method="product", progress=False)
    try:
        results = simple_evaluate(lm, task)
        hits = lm.memo.hits
    finally:
        lm.close()
    assert hits == len(models) * sum(len(r["options"]) for r in MC_ROWS)  # every member's score of every choice
    fused = fuselm_rows(task, models, "product", tmp_path / "fused")
    samples = by_row(results["samples"][task.stem], MC_ROWS)
    for rid, row in fused.items():
        assert [r[0][0] for r in samples[rid]["resps"]] == pytest.approx([c["logprob"] for c in row.choices])


def test_fuselm_works_without_lm_eval_and_says_how_to_get_it(tmp_path):
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['lm_eval'] = None\n"  # as if it were not installed: importing it fails
        "from fuselm.cli import main\n"
        "assert main(['tasks']) == 0\n"
        "sys.exit(main(['lm-eval', '--model', 'fuselm']) * 10 + main(['eval', '--task', 'lm-eval:x.yaml',"
        " '--models', 'smollm2-135m', '--out', 'r']))\n"
    )
    (tmp_path / "x.yaml").write_text("task: x\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 11, done.stderr  # both refused, nothing else broken
    assert done.stderr.count("pip install 'fuselm[lm-eval]'") == 2, done.stderr
