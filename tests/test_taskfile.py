"""Task files: lm-evaluation-harness task YAML read into a fuselm Task (eval/taskfile.py), run by
`fuselm eval` and `fuselm calibrate` like a built-in task; everything else refused by name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from fuselm.calibration import load_calibration
from fuselm.errors import FuselmError
from fuselm.eval.task import load_rows
from fuselm.eval.taskfile import FileTask, load_task_file
from fuselm.eval.tasks import get_task

from .conftest import SHARED_DATA, run_cli, run_cli_here

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")

ROWS = [
    {"question": "What is 2+2?", "answer": "4"},
    {"question": "What is 3+3?", "answer": "6"},
    {"question": "Capital of France?", "answer": ["Paris", "City of Paris"]},
]

BASE = {
    "task": "toy-qa",
    "dataset_path": "json",
    "dataset_kwargs": {"data_files": {"test": "data/test.jsonl"}},
    "test_split": "test",
    "doc_to_text": "Q: {{question}}\nA:",
    "doc_to_target": "answer",
    "generation_kwargs": {"until": ["\n"], "max_gen_toks": 16, "do_sample": False},
    "metric_list": [{"metric": "exact_match", "ignore_case": True}],
}


def write_task(root: Path, rows=ROWS, text: str | None = None, **changes) -> Path:
    """A task file `task.yaml` in `root` (BASE with `changes`; a value of None drops its key),
    with `rows` as data/test.jsonl."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {k: v for k, v in {**BASE, **changes}.items() if v is not None}
    path = root / "task.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(spec, sort_keys=False))
    return path


# --- what a task file becomes ------------------------------------------------------------------------


def test_a_task_file_is_a_task_named_by_its_path_with_lm_evals_prompt(tmp_path):
    path = write_task(
        tmp_path,
        rows=[{"doc_id": 7, **ROWS[0]}, *ROWS[1:]],
        num_fewshot=1,
        description="Answer briefly.\n\n",
        filter_list=[{"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
    )
    task = get_task(str(path))
    assert isinstance(task, FileTask) and task.name == str(path.resolve()) and task.label == "toy-qa"
    assert get_task(task.name) is task  # what runs record reads back (and is read once)
    assert (
        task.stop == ("\n",) and task.max_new_tokens == 16 and task.chat == "raw" and task.main_metric == "exact_match"
    )
    rows = load_rows(task, None)
    assert [r["id"] for r in rows] == [7, 1, 2]  # a row's doc_id, else its line index
    prefix = task.prompt_prefix()
    assert prefix == "Q: What is 2+2?\nA: 4\n\n"  # the first row of the few-shot split (here: test)
    # description + shots (text, target delimiter, first target, few-shot delimiter) + the row's text
    assert task.build_prompt(prefix, rows[2]) == "Answer briefly.\n\nQ: What is 2+2?\nA: 4\n\nQ: Capital of France?\nA:"
    # a row is never its own example: the next row takes its place (lm-eval's rule)
    assert task.build_prompt(prefix, rows[0]) == "Answer briefly.\n\nQ: What is 3+3?\nA: 6\n\nQ: What is 2+2?\nA:"
    assert task.reference(rows[2]) == ["Paris", "City of Paris"]
    assert task.reference_text(rows[2]) == " Paris\n"  # the target up to the stop the shots end in
    assert task.score(" city of paris ", rows[2]) == {"exact_match": 1.0}  # any reference, case ignored
    assert task.score("Paris", rows[0]) == {"exact_match": 0.0}
    assert task.prompt_prefix(shots=0) == ""


def test_regex_filters_pipelines_and_metric_options_follow_lm_eval(tmp_path):
    rows = [{"question": "q", "answer": "Reasoning...\n#### 1,234"}]
    path = write_task(
        tmp_path,
        rows=rows,
        doc_to_target="{{answer.split('####')[-1].strip()}}",
        filter_list=[
            {"name": "strict", "filter": [{"function": "regex", "regex_pattern": r"#### (\-?[0-9\.\,]+)"}]},
            {
                "name": "flexible",
                "filter": [
                    {"function": "regex", "group_select": -1, "regex_pattern": r"(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                    {"function": "take_first"},
                ],
            },
        ],
        metric_list=[
            {"metric": "exact_match", "ignore_case": True, "regexes_to_ignore": [",", r"\$", r"\.$"]},
            {"metric": "f1"},
        ],
    )
    task = get_task(str(path))
    assert set(task.metrics) == {"exact_match,strict", "exact_match,flexible", "f1,strict", "f1,flexible"}
    assert task.main_metric == "exact_match,strict"
    row = load_rows(task, None)[0]
    assert task.reference(row) == "1,234"
    scores = task.score("So it is $1234. Then 12 and 1234.", row)
    assert scores["exact_match,strict"] == 0.0 and scores["exact_match,flexible"] == 1.0
    assert task.extract("nothing here") == "[invalid]"  # the first pipeline's fallback
    assert task.score("#### 1234", row)["exact_match,strict"] == 1.0


def test_a_template_that_reads_as_a_list_gives_several_references_and_corpus_metrics_take_the_first(tmp_path):
    rows = [{"question": "q", "aliases": ["Paris", "Lutetia"]}]
    path = write_task(
        tmp_path,
        rows=rows,
        doc_to_target="{{aliases}}",
        metric_list=[{"metric": "contains"}, {"metric": "chrf", "aggregation": "chrf"}],
        fuselm={"extractor": "first_line", "main_metric": "chrf"},
    )
    task = get_task(str(path))
    row = load_rows(task, None)[0]
    assert task.reference(row) == ["Paris", "Lutetia"] and task.extract(" Lutetia.\nQ: x") == "Lutetia"
    assert task.score("old Lutetia.\n", row) == {"contains": 1.0} and task.main_metric == "chrf"
    assert task.scale() == 1.0 and task.corpus_metrics["chrf"]([" Paris\n"], [task.reference(row)]) == 100.0


def test_a_row_that_a_template_cannot_render_is_one_line_naming_the_row(tmp_path):
    """Templates are checked on each file's first row; a later row that breaks one is named."""
    rows = [{"question": "q", "answer": {"text": "a"}}, {"question": "r", "answer": "b"}]
    task = get_task(str(write_task(tmp_path, rows=rows, doc_to_target="{{answer.text}}")))
    first, second = load_rows(task, None)
    assert task.reference(first) == "a"
    with pytest.raises(FuselmError, match=r"task.yaml: doc_to_target: cannot render the row with id 1: Undefined"):
        task.reference(second)


def test_fuselm_tasks_lists_the_built_in_tasks_and_the_given_files(tmp_path):
    path = write_task(tmp_path, fuselm={"description": "three toy questions"})
    r = run_cli_here("tasks", str(path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["name", "task", "type", "data", "metric", "description"]
    assert any(line.split()[:2] == ["triviaqa", "triviaqa"] and "em" in line.split() for line in lines)
    mine = next(line for line in lines if line.startswith("toy-qa"))
    assert mine.split()[1:5] == [str(path), "generate_until", str(path.parent / "data/test.jsonl"), "exact_match"]
    assert mine.endswith("three toy questions")
    bad = run_cli_here("tasks", str(tmp_path / "nowhere.yaml"))
    assert bad.returncode == 1 and bad.stderr == f"fuselm: error: task file not found: {tmp_path / 'nowhere.yaml'}\n"


# --- what is refused, one line each --------------------------------------------------------------------

BAD = {
    "missing column": (
        {"doc_to_text": "Q: {{questoin}}\nA:"},
        "doc_to_text: the template refers to column 'questoin' that rows of data/test.jsonl lack"
        " (they have: question, answer)",
    ),
    "bare column": (
        {"doc_to_target": "answr"},
        "doc_to_target: 'answr' is neither a column of the rows of data/test.jsonl (they have: question, answer)"
        " nor a template ({{column}})",
    ),
    "attribute": (
        {"doc_to_target": "{{answer.aliases}}"},
        "doc_to_target: cannot render row 0 of data/test.jsonl: UndefinedError: 'str object' has no attribute 'aliases'",
    ),
    "template syntax": ({"doc_to_text": "Q: {{question}"}, "doc_to_text: bad template: unexpected '}'"),
    "unknown metric": (
        {"metric_list": [{"metric": "exact_mach"}]},
        "metric_list[0]: unknown metric 'exact_mach'. Did you mean 'exact_match'? Known: ",
    ),
    "multiple-choice metric": (
        {"metric_list": [{"metric": "acc"}]},
        "metric_list[0] (acc): a multiple_choice metric; a generate_until task is scored by: exact_match, contains,",
    ),
    "metric option": (
        {"metric_list": [{"metric": "em", "ignore_case": True}]},
        "metric_list[0] (em): unknown option 'ignore_case' (it takes: aggregation, higher_is_better)",
    ),
    "unknown key": (
        {"process_results": "utils.process_results"},
        "unknown key 'process_results' (fuselm reads: task, task_alias, tag, dataset_path,",
    ),
    "bad regex": (
        {"filter_list": [{"name": "strict", "filter": [{"function": "regex", "regex_pattern": "(\\d+"}]}]},
        "filter_list[0] (strict).filter[0]: regex_pattern '(\\\\d+' is not a regular expression: missing ),"
        " unterminated subpattern at position 0",
    ),
    "unknown filter": (
        {"filter_list": [{"name": "vote", "filter": [{"function": "majority_vote"}]}]},
        "filter_list[0] (vote).filter[0]: filter 'majority_vote' is not read (fuselm reads: regex, take_first,",
    ),
    "missing data file": (
        {"dataset_kwargs": {"data_files": {"test": "data/nope.jsonl"}}},
        "dataset_kwargs.data_files.test: file not found: data/nope.jsonl (relative to ",
    ),
    "hub dataset": (
        {"dataset_path": "gsm8k"},
        "dataset_path: 'gsm8k' is not read: fuselm reads local JSON Lines files",
    ),
    "unknown split": (
        {"test_split": "tset"},
        "test_split: 'tset' is not a split of dataset_kwargs.data_files (it has: test)",
    ),
    "loglikelihood": (
        {"output_type": "loglikelihood"},
        "output_type: loglikelihood is not read yet (fuselm reads generate_until and multiple_choice tasks;"
        " loglikelihood is to come)",
    ),
    "multiple_choice generating": (
        {"output_type": "multiple_choice", "doc_to_choice": "['4', '6']"},
        "generation_kwargs: not read with output_type: multiple_choice (its choices are scored, nothing is generated)",
    ),
    "choices without multiple_choice": (
        {"doc_to_choice": "['4', '6']"},
        "doc_to_choice: read with output_type: multiple_choice only",
    ),
    "sampling": (
        {"generation_kwargs": {"until": ["\n"], "top_p": 0.9}},
        "generation_kwargs: 'top_p' is not read (fuselm reads: until, max_gen_toks, do_sample: false,",
    ),
    "random shots": (
        {"num_fewshot": 1, "fewshot_config": {"sampler": "default"}},
        "fewshot_config.sampler: 'default' is not read: fuselm takes the first num_fewshot examples, in order",
    ),
    "too many shots": ({"num_fewshot": 5}, "num_fewshot: 5 examples asked for, data/test.jsonl has 3 rows"),
    "fuselm key": ({"fuselm": {"prompt_file": "p.txt"}}, "fuselm: unknown key 'prompt_file' (fuselm reads: "),
    "main metric": (
        {"fuselm": {"main_metric": "em"}},
        "fuselm.main_metric: 'em' is not one of its metrics (exact_match)",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_task_file_is_refused_with_one_line_naming_the_key(tmp_path, case):
    changes, message = BAD[case]
    path = write_task(tmp_path, **changes)
    r = run_cli_here("tasks", str(path))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith(f"fuselm: error: {path}: {message}"), r.stderr
    assert r.stderr.count("\n") == 1


def test_python_in_a_task_file_and_an_empty_data_file_are_refused(tmp_path):
    text = yaml.safe_dump(BASE, sort_keys=False).replace("doc_to_target: answer", "doc_to_target: !function utils.t")
    path = write_task(tmp_path, text=text)
    with pytest.raises(FuselmError, match=r"task.yaml: doc_to_target: '!function utils.t' is Python, which fuselm"):
        load_task_file(path)
    path = write_task(tmp_path, rows=[])
    r = run_cli_here("eval", "--task", str(path), "--model", "x", "--out", str(tmp_path / "run"))
    assert r.returncode == 1
    assert r.stderr == f"fuselm: error: {path}: dataset_kwargs.data_files.test: data/test.jsonl has no rows\n"


def test_an_unknown_task_name_is_still_a_did_you_mean(tmp_path):
    r = run_cli_here("eval", "--task", "trivaqa", "--model", "x", "--out", str(tmp_path / "run"))
    assert r.returncode == 1 and "unknown task 'trivaqa'. Did you mean 'triviaqa'?" in r.stderr


# --- a task file runs as the built-in task it describes -------------------------------------------------


def triviaqa_file(root: Path) -> Path:
    """A task file that says what the built-in `triviaqa` task is (paths relative to the file)."""
    root.mkdir(parents=True, exist_ok=True)
    shared = Path(os.path.relpath(SHARED_DATA / "triviaqa", root))
    spec = {
        "task": "triviaqa-file",
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {"test": str(shared / "test_0-999.jsonl"), "validation": str(shared / "dev_1000-1999.jsonl")}
        },
        "test_split": "test",
        "validation_split": "validation",
        "output_type": "generate_until",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "answer",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 32, "do_sample": False, "temperature": 0},
        "metric_list": [
            {"metric": "em", "aggregation": "mean", "higher_is_better": True},
            {"metric": "f1"},
            {"metric": "paper_match"},
        ],
        "fuselm": {"prompt_prefix_file": str(shared / "prompt.txt"), "extractor": "first_line"},
    }
    path = root / "triviaqa.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "rows.jsonl").read_text().splitlines()]


@needs_data
def test_a_task_file_of_triviaqa_gives_the_built_in_tasks_prompts_outputs_and_scores(tiny_dirs, tmp_path):
    model = str(tiny_dirs.get("llama") or next(iter(tiny_dirs.values())))
    path = triviaqa_file(tmp_path / "tasks")
    mine, builtin = get_task(str(path)), get_task("triviaqa")
    assert (mine.stop, mine.max_new_tokens, mine.chat, mine.fields) == (
        builtin.stop, builtin.max_new_tokens, builtin.chat, builtin.fields
    )  # fmt: skip
    assert mine.dev_file == str((SHARED_DATA / "triviaqa" / "dev_1000-1999.jsonl").resolve())
    rows = load_rows(builtin, None, SHARED_DATA)[:5]
    assert [mine.build_prompt(mine.prompt_prefix(), r) for r in rows] == [
        builtin.build_prompt(builtin.prompt_prefix(SHARED_DATA), r) for r in rows
    ]
    assert [mine.reference_text(r) for r in rows] == [builtin.reference_text(r) for r in rows]
    common = ["--model", model, "--limit", "5", "--no-progress"]
    b = run_cli("eval", "--task", "triviaqa", *common, "--out", str(tmp_path / "builtin"))
    assert b.returncode == 0, b.stderr
    # from another directory, the file named relative to it: its paths are relative to the file
    f = run_cli("eval", "--task", "tasks/triviaqa.yaml", *common, "--out", "file", cwd=tmp_path)
    assert f.returncode == 0, f.stderr
    keys = ("id", "prompt", "output", "answer", "reference", "metrics", "finish_reason", "new_tokens")
    assert [{k: r[k] for k in keys} for r in _rows(tmp_path / "file")] == [
        {k: r[k] for k in keys} for r in _rows(tmp_path / "builtin")
    ]
    assert any(r["output"].strip() for r in _rows(tmp_path / "file"))  # the model wrote something to compare
    summary = json.loads(f.stdout)
    assert summary["task"] == str(path.resolve()) and summary["main_metric"] == "em"
    assert summary["metrics"] == json.loads(b.stdout)["metrics"]
    config = json.loads((tmp_path / "file" / "config.json").read_text())
    assert config["spec"]["task"] == str(path.resolve())
    named = ("test_0-999.jsonl", "dev_1000-1999.jsonl", "prompt.txt")  # the file and the files it names
    assert set(config["task_file"]["sha256"]) == {
        str(path.resolve()), *(str((SHARED_DATA / "triviaqa" / n).resolve()) for n in named)
    }  # fmt: skip
    report = run_cli_here("report", str(tmp_path / "file"))
    assert report.returncode == 0 and "em" in report.stdout, report.stderr
    # the same command again: the finished run, nothing new; an edited task file is refused, not mixed
    again = run_cli_here("eval", "--task", "tasks/triviaqa.yaml", *common, "--out", "file", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    path.write_text(path.read_text() + "# edited\n")
    edited = run_cli_here("eval", "--task", str(path), *common, "--out", str(tmp_path / "file"))
    assert edited.returncode == 1 and edited.stderr.count("\n") == 1
    assert f"holds a run of the task file {path.resolve()} as it was before {path.resolve()} changed" in edited.stderr


# --- calibrate ------------------------------------------------------------------------------------------


def test_calibrate_takes_a_task_file_and_eval_takes_its_calibration(answer_models, tmp_path):
    """Two constant models (`right` writes " a a a", the answer of every row; `wrong` " b b b")."""
    root = tmp_path / "task"
    (root / "data").mkdir(parents=True)
    for split, ids in (("dev", range(6)), ("test", range(6, 10))):
        rows = [{"question": f"Question number {i}?", "answer": ["a a a"]} for i in ids]
        (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "prompt.txt").write_text("Question: Say a.\nAnswer: a a a\n")
    spec = {
        **BASE,
        "task": "say-a",
        "dataset_kwargs": {"data_files": {"test": "data/test.jsonl", "validation": "data/dev.jsonl"}},
        "validation_split": "validation",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "metric_list": [{"metric": "em"}, {"metric": "f1"}],
        "fuselm": {"prompt_prefix_file": "prompt.txt", "extractor": "first_line"},
    }
    (root / "task.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    models = f"{answer_models['wrong']},{answer_models['right']}"
    out = tmp_path / "calib.yaml"
    r = run_cli("calibrate", "--task", "task/task.yaml", "--models", models, "--limit", "4", "--max-new-tokens",
                "3", "--thetas", "0.5", "--margins", "0", "--no-progress", "--out", str(out), cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    cal = load_calibration(out)
    assert cal.task == str((root / "task.yaml").resolve()) and cal.metric == "em"
    assert cal.anchor == answer_models["right"] and cal.dev.ids == [0, 1, 2, 3]
    assert cal.dev.file == str((root / "data" / "dev.jsonl").resolve())
    runs = sorted(out.with_suffix(".runs").glob("*/config.json"))
    assert runs and all("task_file" in json.loads(p.read_text()) for p in runs)
    ev = run_cli("eval", "--task", str(root / "task.yaml"), "--calibration", str(out), "--max-new-tokens", "3",
                 "--out", str(tmp_path / "run"), "--no-progress")  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    summary = json.loads(ev.stdout)
    assert summary["models"] == [answer_models["right"]] and summary["metrics"]["em"] == 1.0 and summary["n"] == 4
    other = run_cli_here("eval", "--task", "triviaqa", "--calibration", str(out), "--out", str(tmp_path / "x"))
    assert other.returncode == 1 and f"calibrates task {cal.task!r}, not 'triviaqa'" in other.stderr
