"""Multiple choice by fused likelihood (eval/choice.py): task files with `output_type:
multiple_choice` (eval/taskfile.py), each member's string log-likelihood of each choice, the
`product` and `mixture` rules, acc and acc_norm as lm-eval defines them, and `fuselm eval` on
ARC-Easy rows, resumable."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml

from fuselm.config import GenerationConfig, ModelConfig
from fuselm.errors import FuselmError
from fuselm.eval.choice import ChoiceScorer, fuse, predictions
from fuselm.eval.records import EvalSpec
from fuselm.eval.rundir import read_rows
from fuselm.eval.runner import run_eval
from fuselm.eval.task import load_rows
from fuselm.eval.taskfile import load_task_file
from fuselm.models.loading import Model
from fuselm.models.session import DecodingSession

from .conftest import SHARED_DATA, run_cli, run_cli_here
from .support import constant_model, write_task

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
RAW = GenerationConfig(chat="raw")

# lm-eval's own arc_easy.yaml (lm_eval/tasks/arc/arc_easy.yaml), with local files for the hub dataset
ARC = {
    "tag": ["ai2_arc"],
    "task": "arc_easy",
    "output_type": "multiple_choice",
    "training_split": "train",
    "validation_split": "validation",
    "test_split": "test",
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "{{choices.label.index(answerKey)}}",
    "doc_to_choice": "{{choices.text}}",
    "should_decontaminate": True,
    "doc_to_decontamination_query": "Question: {{question}}\nAnswer:",
    "metric_list": [
        {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
    ],
    "metadata": {"version": 1.0},
}


def arc_file(directory: Path, data_files: dict[str, str]) -> Path:
    path = directory / "arc_easy.yaml"
    spec = {**ARC, "dataset_path": "json", "dataset_kwargs": {"data_files": data_files}}
    for key, split in [("training_split", "train"), ("validation_split", "validation")]:
        if split not in data_files:
            del spec[key]
    path.write_text(yaml.safe_dump(spec))
    return path


# --- the task file ------------------------------------------------------------------------------------


@needs_data
def test_lm_evals_own_arc_easy_file_loads_with_local_files(tmp_path):
    shared = Path(os.path.relpath(SHARED_DATA / "arc_easy", tmp_path))
    path = arc_file(
        tmp_path,
        {
            "test": str(shared / "test_0-999.jsonl"),
            "validation": str(shared / "dev.jsonl"),
            "train": str(shared / "train.jsonl"),
        },
    )
    task = load_task_file(path)
    assert task.output_type == "multiple_choice" and list(task.metrics) == ["acc", "acc_norm"]
    assert task.main_metric == "acc" and task.dev_file and task.train_file
    rows = load_rows(task, None)
    assert len(rows) == 1000
    row = rows[0]
    assert task.build_prompt(task.prompt_prefix(), row) == f"Question: {row['question']}\nAnswer:"
    assert task.choices(row) == row["choices"]["text"]
    assert task.gold(row) == row["choices"]["label"].index(row["answerKey"])
    gold_text = row["choices"]["text"][task.gold(row)]
    assert task.reference_text(row) == " " + gold_text  # lm-eval's continuation: target_delimiter + choice
    # every row of the file resolves its answer (some ARC rows are labelled 1-4, not A-D)
    assert all(0 <= task.gold(r) < len(task.choices(r)) for r in rows)


CHOICE_ROWS = [
    {"q": "first?", "options": ["yes", "no"], "answer": 1, "letter": "B", "texts": "no"},
    {"q": "second?", "options": ["no", "yes", "maybe"], "answer": 0, "letter": "A", "texts": "no"},
]


@pytest.mark.parametrize(
    ("changes", "gold"),
    [
        ({}, [1, 0]),  # a column holding an index
        ({"doc_to_target": "texts"}, [1, 0]),  # a column holding the choice's text
        ({"doc_to_target": "{{['A', 'B', 'C'].index(letter)}}"}, [1, 0]),  # a label looked up: digits, an index
        ({"doc_to_target": "{{texts}}"}, [1, 0]),  # a template rendering the text
        ({"doc_to_target": 0}, [0, 0]),  # one index for every row
        ({"doc_to_target": "{{[0, answer]}}"}, [[0, 1], [0, 0]]),  # several right choices
    ],
)
def test_doc_to_target_follows_lm_eval(tmp_path, changes, gold):
    task = load_task_file(write_task(tmp_path, CHOICE_ROWS, **changes))
    assert [task.gold(r) for r in load_rows(task, None)] == gold


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("options", [["yes", "no"], ["no", "yes", "maybe"]]),  # a column
        ("{{options}}", [["yes", "no"], ["no", "yes", "maybe"]]),  # a template rendering a list
        (["no", "yes", "maybe"], [["no", "yes", "maybe"]] * 2),  # a YAML list
    ],
)
def test_doc_to_choice_is_a_column_a_template_or_a_list(tmp_path, choice, expected):
    task = load_task_file(write_task(tmp_path, CHOICE_ROWS, doc_to_choice=choice, doc_to_target="texts"))
    assert [task.choices(r) for r in load_rows(task, None)] == expected


BAD = {
    "label not looked up": (
        {"doc_to_target": "letter"},
        "doc_to_target: 'B' is neither an index into the choices nor one of them ('yes', 'no'); a label is looked up"
        ' with a template, e.g. "{{choices.label.index(answerKey)}}" on row 0 of data/test.jsonl',
    ),
    "index out of range": ({"doc_to_target": 5}, "doc_to_target: index 5 is out of range of 2 choices"),
    "no choices": ({"doc_to_choice": None}, "doc_to_choice: missing for output_type: multiple_choice"),
    "not a list": ({"doc_to_choice": "{{q}}"}, "doc_to_choice: the template renders 'first?', not a list"),
    "generation metric": (
        {"metric_list": [{"metric": "exact_match"}]},
        "metric_list[0] (exact_match): a generate_until metric; a multiple_choice task is scored by: acc, acc_norm,"
        " acc_bytes",
    ),
    "multiple inputs": ({"doc_to_text": "{{answer}}"}, "doc_to_text: renders an index on row 0 of data/test.jsonl"),
    "filters": ({"filter_list": []}, "filter_list: not read with output_type: multiple_choice"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_multiple_choice_file_is_refused_with_one_line(tmp_path, case):
    changes, message = BAD[case]
    path = write_task(tmp_path, CHOICE_ROWS, **changes)
    r = run_cli_here("tasks", str(path))
    assert r.returncode == 1 and r.stderr.startswith(f"fuselm: error: {path}: {message}"), r.stderr
    assert r.stderr.count("\n") == 1


# --- the rules ----------------------------------------------------------------------------------------


def test_the_rules():
    lps, w = [math.log(0.5), math.log(0.1)], [3.0, 1.0]
    assert fuse(lps, w, "product") == pytest.approx((3 * math.log(0.5) + math.log(0.1)) / 4)
    assert fuse(lps, w, "mixture") == pytest.approx(math.log((3 * 0.5 + 0.1) / 4))
    assert fuse([-math.inf, -1.0], w, "product") == -math.inf
    assert fuse([-math.inf, -1.0], w, "mixture") == pytest.approx(math.log(1 / 4) - 1.0)
    assert fuse([-2.0], [5.0], "product") == fuse([-2.0], [5.0], "mixture") == pytest.approx(-2.0)


def test_acc_norm_divides_by_the_choice_length_in_characters_without_the_delimiter():
    # acc takes the highest log-likelihood; acc_norm per character of the choice as lm-eval
    # measures it (len(choice), not len(" " + choice): with the delimiter these two would tie)
    picks = predictions([-1.0, -1.5], ["a", "bb"])
    assert picks["acc"] == 0 and picks["acc_norm"] == 1
    picks = predictions([-2.0, -2.0], ["é", "ab"])  # 1 character of 2 bytes, 2 characters of 2 bytes
    assert picks["acc"] == 0 and picks["acc_norm"] == 1 and picks["acc_bytes"] == 0  # ties go to the first


@pytest.fixture(scope="module")
def right_wrong(smol_tokenizer_dir):
    right = constant_model(smol_tokenizer_dir, {" a": 8.0, " b": 1.0}, "right")
    wrong = constant_model(smol_tokenizer_dir, {" b": 8.0, " a": 1.0}, "wrong")
    return right, wrong


@pytest.mark.parametrize("rule", ["product", "mixture"])
def test_the_weights_decide_between_a_right_and_a_wrong_member(right_wrong, rule):
    right, wrong = right_wrong
    for weights, picked in [([3, 1], 0), ([1, 3], 1)]:
        scorer = ChoiceScorer(rule, [right, wrong], {"weights": weights})
        member, passes = scorer.member_scores("Q: which?\nA:", ["a", "b"], RAW, " ")
        assert predictions(scorer.fused(member), ["a", "b"])["acc"] == picked
        assert passes == {"right": 1, "wrong": 1}  # all choices in one batched pass per member
    # the models' configured weights where no option is given
    heavy = Model(wrong.backend, ModelConfig(name="wrong", weight=5.0))
    scorer = ChoiceScorer(rule, [right, heavy])
    assert scorer.weights == [1.0, 5.0]
    assert predictions(scorer.fused(scorer.member_scores("Q:", ["a", "b"], RAW, " ")[0]), ["a", "b"])["acc"] == 1


def test_acc_and_acc_norm_differ_where_a_longer_choice_is_likelier_per_character(right_wrong, tmp_path):
    right, _ = right_wrong
    rows = [{"q": "x", "options": ["a", "a a a a"], "answer": 1}]
    task = load_task_file(write_task(tmp_path, rows))
    row = load_rows(task, None)[0]
    out = ChoiceScorer("single", [right]).row(task, "", RAW, row)
    # " a" costs about 0.001 nats; " a a a a" four times that over 7 characters
    assert out.metrics == {"acc": 0.0, "acc_norm": 1.0}
    assert out.output == "a" and out.answer == "0" and out.reference == 1
    assert [c["tokens"]["right"] for c in out.choices] == [1, 4]


@pytest.fixture(scope="module")
def two_tiny(tiny_backends):
    backends = list(tiny_backends.values())
    if len(backends) < 2:
        pytest.skip("needs two tiny models")
    return [Model(b, ModelConfig(name=b.info.name)) for b in backends[:2]]


@pytest.mark.parametrize("rule", ["product", "mixture"])
def test_the_fused_likelihood_is_the_rule_over_each_members_own_string_logprob(two_tiny, rule):
    """Each member scored alone, one choice at a time in a fresh session, then the rule by hand:
    the same numbers as the batched, fused scoring."""
    prompt, choices = "Question: What is red?\nAnswer:", ["an apple", "the sky at noon", "blood"]
    weights = [2.0, 0.5]
    scorer = ChoiceScorer(rule, two_tiny, {"weights": weights})
    fused = scorer.fused(scorer.member_scores(prompt, choices, RAW, " ")[0])
    for j, choice in enumerate(choices):
        own = []
        for m in two_tiny:
            with DecodingSession(m.backend, prompt) as s:
                own.append(s.score([" " + choice])[0].logprob)
        if rule == "product":
            expected = (weights[0] * own[0] + weights[1] * own[1]) / sum(weights)
        else:
            expected = math.log((weights[0] * math.exp(own[0]) + weights[1] * math.exp(own[1])) / sum(weights))
        assert fused[j] == pytest.approx(expected, abs=1e-4)


# --- fuselm eval --------------------------------------------------------------------------------------


@pytest.fixture
def arc_five(tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present")
    lines = (SHARED_DATA / "arc_easy" / "test_0-999.jsonl").read_text().splitlines()[:5]
    (tmp_path / "arc5.jsonl").write_text("\n".join(lines) + "\n")
    return arc_file(tmp_path, {"test": "arc5.jsonl"})


@needs_data
def test_fuselm_eval_runs_an_arc_easy_file_with_two_models_and_resumes(arc_five, tiny_dirs, tmp_path):
    dirs = [str(d) for d in list(tiny_dirs.values())[:2]]
    if len(dirs) < 2:
        pytest.skip("needs two tiny models")
    out = tmp_path / "run"
    args = ["eval", "--task", str(arc_five), "--models", ",".join(dirs), "--method", "mixture",
            "-O", "weights=[2,1]", "--out", str(out), "--no-progress"]  # fmt: skip
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 5 and summary["complete"] and set(summary["metrics"]) == {"acc", "acc_norm"}
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    task = load_task_file(arc_five)
    for row, data in zip(rows, load_rows(task, None)):
        assert set(row["metrics"]) == {"acc", "acc_norm"}
        assert row["reference"] == task.gold(data) and row["output"] == task.choices(data)[int(row["answer"])]
        assert [c["text"] for c in row["choices"]] == task.choices(data) and row["finish_reason"] == "scored"
        fused = [c["logprob"] for c in row["choices"]]
        assert int(row["answer"]) == fused.index(max(fused))
        assert row["metrics"]["acc"] == float(int(row["answer"]) == row["reference"])
    # resumed after an interruption: the finished rows kept as they were, the rest scored
    lines = (out / "rows.jsonl").read_text().splitlines(keepends=True)
    (out / "rows.jsonl").write_text("".join(lines[:2]))
    spec = EvalSpec.model_validate(json.loads((out / "config.json").read_text())["spec"])
    again = run_eval(spec, out, show_progress=False)
    assert again.n == 5 and again.metrics == pytest.approx(summary["metrics"])
    after = (out / "rows.jsonl").read_text().splitlines(keepends=True)
    assert after[:2] == lines[:2] and [json.loads(x)["id"] for x in after] == [r["id"] for r in rows]
    for x, row in zip(after, rows):
        assert [c["logprob"] for c in json.loads(x)["choices"]] == pytest.approx([c["logprob"] for c in row["choices"]])
    assert all(r.choices for r in read_rows(out / "rows.jsonl"))


def test_a_multiple_choice_task_refuses_generation_methods_and_the_rules_refuse_generation(tmp_path, right_wrong):
    path = write_task(tmp_path, CHOICE_ROWS)
    r = run_cli_here(
        "eval", "--task", str(path), "--models", "a,b", "--method", "adafuse", "--out", str(tmp_path / "o")
    )
    assert r.returncode == 1 and r.stderr == (
        "fuselm: error: task toy-mc is multiple_choice: its choices are scored, nothing is generated, so method"
        " 'adafuse' does not apply; it runs with single (one model), or product or mixture (several;"
        " -O weights=[W1,W2,...])\n"
    )
    r = run_cli_here("eval", "--task", str(path), "--models", "a,b", "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and "method 'single' takes 1 model, got 2: fuse several with --method product" in r.stderr
    r = run_cli_here("eval", "--task", str(path), "--models", "a,b", "--method", "product", "-O", "weights=[1]",
                     "--out", str(tmp_path / "o"))  # fmt: skip
    assert r.returncode == 1 and "weights must be 2 positive numbers, one per model; got [1.0]" in r.stderr
    r = run_cli_here("eval", "--task", str(path), "--models", "a,b", "--method", "mixture", "-O", "theta=1",
                     "--out", str(tmp_path / "o"))  # fmt: skip
    assert r.returncode == 1 and "options of method 'mixture'" in r.stderr and "theta" in r.stderr
    r = run_cli_here(
        "eval", "--task", "triviaqa", "--models", "a,b", "--method", "product", "--out", str(tmp_path / "o")
    )
    assert (
        r.returncode == 1 and "method 'product' fuses the likelihoods of a multiple_choice task's choices" in r.stderr
    )
    with pytest.raises(FuselmError, match="method 'single' takes no options"):
        ChoiceScorer("single", [right_wrong[0]], {"weights": [1]})


def test_fuselm_eval_picks_what_the_weights_say_on_saved_models(tmp_path, answer_models):
    rows = [{"q": f"number {i}?", "options": ["a", "b"], "answer": 0} for i in range(3)]
    path = write_task(tmp_path, rows)
    models = f"{answer_models['right']},{answer_models['wrong']}"
    for weights, acc in [("[4,1]", 1.0), ("[1,4]", 0.0)]:
        out = tmp_path / f"run{acc}"
        spec = EvalSpec(task=str(path), method="product", models=[ModelConfig(name=m) for m in models.split(",")],
                        method_options={"weights": yaml.safe_load(weights)})  # fmt: skip
        summary = run_eval(spec, out, show_progress=False)
        assert summary.metrics == {"acc": acc, "acc_norm": acc}


def test_calibrate_chooses_how_to_fuse_a_multiple_choice_task_and_eval_takes_it(tmp_path, answer_models):
    """`fuselm calibrate` on a multiple-choice task file races its own grid (product over the
    kept members, mixture over all, equal and quality weights) on the validation rows; `right`
    is right on every row, so nothing beats it and it runs alone; eval takes the calibration on
    the test rows and refuses its dev rows; a controller is refused for such a task."""
    rows = [{"q": f"number {i}?", "options": ["a", "b"], "answer": 0} for i in range(6)]
    path = write_task(tmp_path, rows)
    (tmp_path / "data" / "dev.jsonl").write_text("".join(json.dumps({**r, "q": f"dev {r['q']}"}) + "\n" for r in rows))
    spec = yaml.safe_load(path.read_text())
    spec["dataset_kwargs"]["data_files"]["validation"] = "data/dev.jsonl"
    spec["validation_split"] = "validation"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    models = f"{answer_models['wrong']},{answer_models['right']}"
    out = tmp_path / "calib.yaml"
    r = run_cli("calibrate", "--task", str(path), "--models", models, "--limit", "6", "--min-rows", "1",
                "--max-gap", "100", "--out", str(out), "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    from fuselm.calibration import load_calibration

    cal = load_calibration(out)
    weights = [s.weight for s in cal.scores]
    assert [t.label for t in cal.tried] == ["product", f"product weights={weights}", "mixture",
                                            f"mixture weights={weights}"]  # fmt: skip
    assert {t.method for t in cal.tried} == {"product", "mixture"} and all(t.n == 6 for t in cal.tried)
    assert cal.anchor == answer_models["right"] and cal.method == "single" and cal.models == [answer_models["right"]]
    assert weights[1] == 1.0 and weights[0] < 1.0  # `right` knows the references best
    ev = run_cli(
        "eval", "--task", str(path), "--calibration", str(out), "--out", str(tmp_path / "run"), "--no-progress"
    )
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["metrics"] == {"acc": 1.0, "acc_norm": 1.0}
    ctl = run_cli_here("calibrate", "--task", str(path), "--models", models, "--controller-rows", "3", "--out",
                       str(tmp_path / "c2.yaml"))  # fmt: skip
    assert ctl.returncode == 1 and "a fusion controller steers generation" in ctl.stderr
