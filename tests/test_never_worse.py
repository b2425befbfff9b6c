"""Fusion that never loses to its best member: anchored AdaFuse and `fuselm calibrate`, on
constructed models whose next-token distributions are fixed (tests/support.py's
`constant_model`), saved as model directories for the command line."""

from __future__ import annotations

import json
import math

import pytest

from fuselm import GenerationConfig
from fuselm.calibration import Trial, load_calibration
from fuselm.config import ModelConfig
from fuselm.errors import FuselmError
from fuselm.eval.calibrate import _slug, check_unused, choose, choose_anchor
from fuselm.eval.records import EvalSpec
from fuselm.eval.report import RunView, calibration_points, paired_difference
from fuselm.eval.tasks import get_task
from fuselm.fusion.loop import generate
from fuselm.serve.config import Setup

from .conftest import run_cli, run_cli_here
from .support import answer_rows, as_model, constant_model


def anchored(models, max_new_tokens=6, method="adafuse", **opts):
    gen = GenerationConfig(max_new_tokens=max_new_tokens, chat="raw")
    return generate(models, "start", method, gen, {"policy": "anchored", **opts})


SPAN_METHODS = ["adafuse", "fixed-span"]  # the anchored methods that score candidates


@pytest.mark.parametrize("method", SPAN_METHODS)
def test_a_confident_anchor_commits_alone_and_the_others_are_never_asked(smol_tokenizer_dir, method):
    sure = constant_model(smol_tokenizer_dir, {" a": 8.0, " b": 1.0}, "sure")
    other = constant_model(smol_tokenizer_dir, {" b": 8.0, " a": 1.0}, "other")
    res = anchored([sure, other], max_new_tokens=9, method=method)
    assert res.text == " a" * 9 and all(t.confident and t.source == "sure" for t in res.trace)
    assert res.stats.forward_passes["other"] == 0  # it only read the committed text, lazily
    # the same models with the anchor named: the other one decides now
    res = anchored([sure, other], max_new_tokens=3, method=method, anchor="other")
    assert res.text == " b b b" and res.trace[0].margins == {"other": pytest.approx(0.998, abs=1e-3)}


@pytest.mark.parametrize("method", SPAN_METHODS)
def test_an_unsure_anchor_is_overridden_only_by_the_margin(smol_tokenizer_dir, method):
    unsure = constant_model(smol_tokenizer_dir, {" a": 2.0, " b": 1.9, " c": 0.5}, "unsure")
    sure = constant_model(smol_tokenizer_dir, {" b": 6.0, " a": 1.0}, "sure")
    first = anchored([unsure, sure], max_new_tokens=2, method=method).trace[0]
    assert not first.confident and first.overridden and first.text.startswith(" b")
    own = next(c for c in first.candidates if c.kind == "proposal" and "unsure" in c.proposers)
    assert own.text == " a" and first.candidates[first.winner].score < own.score
    gap = own.score - first.candidates[first.winner].score
    kept = anchored([unsure, sure], max_new_tokens=2, method=method, override_margin=gap + 0.01).trace[0]
    assert kept.text == " a" and kept.overridden is False and kept.source == "unsure"
    # the method's equal vote picks the same candidate as the overriding anchor above
    vote = generate([unsure, sure], "start", method, GenerationConfig(max_new_tokens=2, chat="raw"))
    assert vote.trace[0].text == first.text and vote.trace[0].overridden is None
    with pytest.raises(Exception, match="anchor needs policy anchored"):
        generate([unsure, sure], "start", method, GenerationConfig(max_new_tokens=2, chat="raw"), {"anchor": "sure"})


def test_the_anchor_must_be_one_of_the_models(smol_tokenizer_dir):
    a = constant_model(smol_tokenizer_dir, {" a": 8.0, " b": 1.0}, "alpha")
    b = constant_model(smol_tokenizer_dir, {" b": 8.0, " a": 1.0}, "beta")
    with pytest.raises(FuselmError, match="Did you mean 'alpha'"):
        anchored([a, b], anchor="alpah")
    with pytest.raises(FuselmError, match="0..1"):
        anchored([a, b], anchor=2)
    assert anchored([a, b], max_new_tokens=1, anchor=1).text == " b"


@pytest.mark.parametrize("method", ["token-average", "unite"])
def test_token_fusion_gated_by_the_anchor(smol_tokenizer_dir, method):
    """Policy anchored on the token-level methods (GaC's gate): a sure anchor's token stands
    against a heavier-weighted other model, which is never asked; an unsure one is outvoted."""
    sure = constant_model(smol_tokenizer_dir, {" a": 8.0, " b": 1.0}, "sure")
    unsure = constant_model(smol_tokenizer_dir, {" a": 2.0, " b": 1.9}, "unsure")
    heavy = constant_model(smol_tokenizer_dir, {" b": 8.0, " a": 1.0}, "heavy")
    gen = GenerationConfig(max_new_tokens=4, chat="raw")

    def run(models, **opts):
        return generate(models, "start", method, gen, {"weights": [1.0, 3.0], **opts})

    assert run([sure, heavy]).text == " b b b b"  # the plain average follows the heavier model
    gated = run([sure, heavy], policy="anchored")
    assert gated.text == " a a a a" and all(t.confident and t.source == "sure" for t in gated.trace)
    assert gated.trace[0].margins == {"sure": pytest.approx(0.998, abs=1e-3)}
    assert gated.stats.forward_passes["heavy"] == 0  # it only read the committed text, lazily
    outvoted = run([unsure, heavy], policy="anchored")
    assert outvoted.text == " b b b b" and not any(t.confident for t in outvoted.trace)
    # the anchor by name; a theta above its margin lets the others in
    assert run([heavy, sure], policy="anchored", anchor="sure").text == " a a a a"
    assert run([sure, heavy], policy="anchored", theta=1.0).text == " b b b b"
    with pytest.raises(FuselmError, match="Did you mean 'sure'"):
        run([sure, heavy], policy="anchored", anchor="suer")
    with pytest.raises(Exception, match="anchor needs policy anchored"):
        run([sure, heavy], anchor="sure")


def test_a_draft_the_others_confirm_is_committed_in_one_step_and_one_pass_each(smol_tokenizer_dir):
    unsure = constant_model(smol_tokenizer_dir, {" a": 2.0, " b": 1.9}, "unsure")
    agrees = constant_model(smol_tokenizer_dir, {" a": 6.0, " b": 1.0}, "agrees")
    word_by_word = anchored([unsure, agrees], max_new_tokens=8)
    drafted = anchored([unsure, agrees], max_new_tokens=8, draft_words=4)
    assert drafted.text == word_by_word.text == " a" * 8
    # two drafts of four words, each checked by the other model in one pass
    assert [t.text for t in drafted.trace] == [" a a a a"] * 2 and [t.checked for t in drafted.trace] == [4, 4]
    assert all(t.confident and len(t.candidates) == 1 and t.source == "unsure" for t in drafted.trace)
    assert len(word_by_word.trace) == 8
    assert drafted.stats.forward_passes["agrees"] < word_by_word.stats.forward_passes["agrees"]


def test_where_another_model_would_say_otherwise_the_draft_stops_and_a_round_decides(smol_tokenizer_dir):
    # the anchor is unsure between " a" and " b" everywhere, the other always says " b": the draft
    # stops at its first word, where the word-by-word round scores both proposals
    unsure = constant_model(smol_tokenizer_dir, {" a": 2.0, " b": 1.9, " c": 0.5}, "unsure")
    objects = constant_model(smol_tokenizer_dir, {" b": 6.0, " a": 1.0}, "objects")
    word_by_word = anchored([unsure, objects], max_new_tokens=3)
    drafted = anchored([unsure, objects], max_new_tokens=3, draft_words=4)
    assert drafted.text == word_by_word.text
    first = drafted.trace[0]
    assert not first.confident and first.overridden and first.text.startswith(" b")  # a scored round
    assert [t.text for t in drafted.trace] == [t.text for t in word_by_word.trace]


def test_a_draft_needs_the_anchored_policy_and_models_in_this_process(smol_tokenizer_dir):
    from fuselm.config import ModelConfig
    from fuselm.models.remote import RemoteModel

    a = constant_model(smol_tokenizer_dir, {" a": 8.0, " b": 1.0}, "alpha")
    with pytest.raises(FuselmError, match="draft_words needs policy anchored"):
        generate([a, a], "start", "adafuse", GenerationConfig(max_new_tokens=2, chat="raw"), {"draft_words": 3})
    far = RemoteModel.from_config(ModelConfig(name="far", engine="vllm", url="http://127.0.0.1:9", model="m"))
    with pytest.raises(FuselmError, match="'far' is on vllm at http://127.0.0.1:9: use draft_words 0"):
        anchored([a, far], draft_words=3)  # refused before any request (nothing listens there)


@pytest.mark.parametrize(
    "method, options",
    [
        ("adafuse", {}),
        ("adafuse", {"anchor": 1, "theta": 1.0}),
        ("adafuse", {"theta": 1.0, "draft_words": 5}),
        ("fixed-span", {"anchor": 1, "theta": 1.0, "n_words": 2}),
    ],
)
def test_anchored_fusion_of_identical_models_is_the_single_greedy_text(tiny_backends, method, options):
    """With theta 1.0 the anchor is unsure (but where its top-2 has no mass), so both models propose; being the same model, they
    propose the same word, which is committed unscored: the anchor's greedy text, unchanged.
    (The llama tiny model: a random byte-level model's greedy text cuts UTF-8 characters, which
    no word-level method commits as the token stream does.)"""
    if "llama" not in tiny_backends:
        pytest.skip("the llama tokenizer (smollm2) is not installed")
    m = as_model(tiny_backends["llama"])
    gen = GenerationConfig(max_new_tokens=20, chat="raw")
    for prompt in ["The capital of France is", "def add(a, b):"]:
        single = generate([m], prompt, "single", gen)
        fused = generate([m, m], prompt, method, gen, {"policy": "anchored", **options})
        assert fused.text == single.text and fused.finish_reason == single.finish_reason
        assert all(len(t.candidates) == 1 and not t.overridden for t in fused.trace)
        if "anchor" in options:  # rounds where the anchor was unsure asked both models
            assert any(len(t.candidates[0].proposers) == 2 for t in fused.trace)
        if "draft_words" in options:  # unsure everywhere: every word checked by the other model
            assert sum(t.checked or 0 for t in fused.trace) > len(fused.trace)


# --- calibration -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def answer_data(tmp_path_factory):
    """10 such rows (0-5 dev, 6-9 test)."""
    return answer_rows(tmp_path_factory.mktemp("data"), 10)


def calibrate_cli(answer_models, answer_data, tmp_path, order=("wrong", "right"), *extra):
    out = tmp_path / "calib.yaml"
    models = ",".join(answer_models[n] for n in order)
    r = run_cli("calibrate", "--task", "triviaqa", "--models", models, "--dev-data", "triviaqa/rows.jsonl",
                "--limit", "6", "--max-new-tokens", "3", "--data-dir", str(answer_data), "--out", str(out),
                "--thetas", "0.5", "--margins", "0", "--min-rows", "1", "--no-progress", *extra)  # fmt: skip
    return r, out


def test_calibration_keeps_the_member_that_is_always_right_and_drops_the_other(answer_models, answer_data, tmp_path):
    r, out = calibrate_cli(answer_models, answer_data, tmp_path)
    assert r.returncode == 0, r.stderr
    cal = load_calibration(out)
    right, wrong = answer_models["right"], answer_models["wrong"]
    assert cal.anchor == right and cal.method == "single" and cal.models == [right]
    by_name = {s.name: s for s in cal.scores}
    assert by_name[right].score == 1.0 and by_name[wrong].score == 0.0
    assert not by_name[wrong].kept and "100.0 points below" in by_name[wrong].why_dropped
    # NLL per byte of " a a a\n" (7 bytes): each " b"-preferring token costs `wrong` 7 nats more
    assert by_name[wrong].nll - by_name[right].nll == pytest.approx(3 * 7 / 7, abs=0.01)
    assert by_name[right].weight == 1.0 and by_name[wrong].weight == pytest.approx(
        by_name[right].nll / by_name[wrong].nll, abs=1e-3
    )
    # far apart: no equal-vote adafuse, but over both members the soft votes: token-average (one
    # vocabulary: right's sure " a" outweighs wrong's unsure one) and anchored (the anchor decides while sure)
    weights = [by_name[wrong].weight, 1.0]
    assert [t.label for t in cal.tried] == [  # each method's setups, in the methods' registry order
        "adafuse anchored theta=0.5 margin=0",
        "token-average",
        f"token-average weights={weights}",
        "token-average anchored theta=0.5",
    ]
    assert all(t.models == [wrong, right] and t.score == 1.0 for t in cal.tried)
    assert cal.tried[0].method_options["anchor"] == right and "no fused setup beat it" in cal.reason
    assert cal.anchor_reason == f"{right} (100.0): the best dev score"  # wrong is surely below: not weighed
    assert cal.dev.ids == list(range(6)) and cal.dev.file == "triviaqa/rows.jsonl"
    assert "fall back to" in r.stderr and "calibration of triviaqa" in r.stderr  # the table and the choice
    # its picture: the members alone (the right one chosen), then each tried setup, whose interval is
    # the best member's score plus the paired difference's; drawn again without running anything
    points = calibration_points(cal)
    assert [(p.label, p.kind, p.chosen) for p in points[:2]] == [
        (f"{wrong} alone (dropped)", "member", False), (f"{right} alone (anchor)", "anchor", True)
    ]  # fmt: skip
    assert [p.label for p in points[2:]] == [t.label for t in cal.tried] and not any(p.chosen for p in points[2:])
    assert points[2].score == 100.0 and points[2].interval == (
        100.0 + 100 * cal.tried[0].versus_best[1],
        100.0 + 100 * cal.tried[0].versus_best[2],
    )
    rows = {f: f.stat().st_mtime_ns for f in out.with_suffix(".runs").rglob("rows.jsonl")}
    again, _ = calibrate_cli(
        answer_models, answer_data, tmp_path, ("wrong", "right"), "--plot", str(tmp_path / "c.png")
    )
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and rows
    assert {f: f.stat().st_mtime_ns for f in out.with_suffix(".runs").rglob("rows.jsonl")} == rows
    # used by eval: the chosen model on rows the calibration did not use; its rows are refused
    ev = run_cli("eval", "--task", "triviaqa", "--calibration", str(out), "--data-dir", str(answer_data),
                 "--data", str(answer_data / "triviaqa/rows.jsonl"), "--offset", "6", "--max-new-tokens", "3",
                 "--out", str(tmp_path / "run"), "--no-progress")  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    summary = json.loads(ev.stdout)
    assert summary["models"] == [right] and summary["method"] == "single" and summary["metrics"]["em"] == 1.0
    assert summary["n"] == 4
    used = run_cli("eval", "--task", "triviaqa", "--calibration", str(out), "--data-dir", str(answer_data),
                   "--data", str(answer_data / "triviaqa/rows.jsonl"), "--offset", "4", "--out",
                   str(tmp_path / "run2"), "--no-progress")  # fmt: skip
    assert used.returncode == 1 and "2 of the 6 rows to evaluate (ids 4..5) were used to calibrate" in used.stderr


def test_calibration_falls_back_to_single_when_fusion_cannot_help(answer_models, answer_data, tmp_path):
    """Both kept (--max-gap 100): every fused setup ties the right member at best, so the
    calibration runs it alone, and says what it tried."""
    r, out = calibrate_cli(answer_models, answer_data, tmp_path, ("right", "wrong"), "--max-gap", "100")
    assert r.returncode == 0, r.stderr
    cal = load_calibration(out)
    weights = [1.0, cal.scores[1].weight]
    assert [t.label for t in cal.tried] == [
        "adafuse",
        f"adafuse weights={weights}",
        "adafuse prompt_weights=0.1",
        "adafuse anchored theta=0.5 margin=0",
        "token-average",  # the two share one vocabulary
        f"token-average weights={weights}",
        "token-average anchored theta=0.5",
    ]
    assert [t.method for t in cal.tried].count("token-average") == 3
    # averaging right's " a" (p ~ 1) with wrong's (p ~ 1e-3): right's answer, at every weight, gated or not
    assert all(t.score == 1.0 for t in cal.tried if t.method == "token-average")
    anchored = next(t for t in cal.tried if t.label == "adafuse anchored theta=0.5 margin=0")
    assert anchored.score == 1.0 and anchored.versus_best[0] == 0.0  # the anchor decides alone
    assert anchored.method_options["anchor"] == answer_models["right"]
    assert cal.method == "single" and cal.models == [answer_models["right"]]
    assert "no fused setup beat it" in cal.reason
    assert (cal.max_loss, cal.significant) == (0.1, False)  # the choice rule's options, recorded
    again = run_cli(*r.args[3:])  # the same command again: its runs are done, nothing is redone
    assert again.returncode == 0 and load_calibration(out) == cal
    runs = sorted((tmp_path / "calib.runs").glob("*/rows.jsonl"))
    assert len(runs) == 9 and all(len(p.read_text().splitlines()) == 6 for p in runs)
    # a run there that holds another setup (the anchor of an earlier calibration, whose dev rows
    # named another best member): moved aside and run again, not a config mismatch
    cfg = next((tmp_path / "calib.runs").glob("adafuse_anchored*")) / "config.json"
    record = json.loads(cfg.read_text())
    record["spec"]["method_options"]["anchor"] = answer_models["wrong"]
    cfg.write_text(json.dumps(record))
    third = run_cli(*r.args[3:])
    assert third.returncode == 0, third.stderr
    assert "held another setup" in " ".join(third.stderr.split())
    redone = load_calibration(out)  # the same choice and scores (its cost changed: a run was decoded again)
    assert (redone.method, redone.models, redone.anchor) == (cal.method, cal.models, cal.anchor)
    assert [(t.label, t.score) for t in redone.tried] == [(t.label, t.score) for t in cal.tried]
    aside = cfg.parent.with_name(cfg.parent.name + ".superseded")
    assert json.loads((aside / "config.json").read_text())["spec"]["method_options"]["anchor"] == answer_models["wrong"]
    assert json.loads(cfg.read_text())["spec"]["method_options"]["anchor"] == answer_models["right"]


def test_with_three_members_the_calibration_also_fuses_the_best_two_on_the_dev_rows(
    answer_models, answer_data, tmp_path
):
    """AdaFuse's paper fuses the best two of its models per task; calibrate picks them on the dev
    rows: of `wrong`, `right` and a copy of `wrong` (a tie broken by the order given), `right`
    and `wrong`, in the order given."""
    copy = tmp_path / "wrong-copy"
    copy.symlink_to(answer_models["wrong"], target_is_directory=True)
    models = [answer_models["wrong"], answer_models["right"], str(copy)]
    out = tmp_path / "calib.yaml"
    r = run_cli("calibrate", "--task", "triviaqa", "--models", ",".join(models), "--dev-data", "triviaqa/rows.jsonl",
                "--limit", "3", "--max-new-tokens", "3", "--data-dir", str(answer_data), "--out", str(out),
                "--thetas", "0.5", "--margins", "0", "--max-gap", "100", "--min-rows", "1", "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    cal = load_calibration(out)
    tried = {t.label: t for t in cal.tried}
    assert tried["adafuse"].models == models and tried["adafuse combine=median"].models == models
    assert tried["adafuse top-2"].models == models[:2] and tried["adafuse top-2"].n == 3
    assert cal.anchor == answer_models["right"] and cal.method == "single"


def test_token_average_is_tried_only_where_the_members_share_one_vocabulary(tiny_dirs):
    from fuselm.config import ModelConfig
    from fuselm.eval.calibrate import one_vocabulary

    llama, qwen = (ModelConfig(name=str(tiny_dirs[a]), backend="transformers") for a in ("llama", "qwen2"))
    assert one_vocabulary([llama, llama.model_copy(update={"weight": 2.0})])
    assert not one_vocabulary([llama, qwen])


def test_a_calibration_gives_generate_and_serve_its_setup_and_refuses_a_mismatch(answer_models, answer_data, tmp_path):
    r, out = calibrate_cli(answer_models, answer_data, tmp_path)
    assert r.returncode == 0, r.stderr
    g = run_cli("generate", "--calibration", str(out), "--raw", "--max-new-tokens", "3", "--json", "Say a.")
    assert g.returncode == 0, g.stderr
    assert json.loads(g.stdout)["text"] == " a a a" and json.loads(g.stdout)["models"] == ["right"]
    setup = Setup(id="calibrated", calibration=str(out))
    assert [m.name for m in setup.models] == [answer_models["right"]] and setup.method == "single"
    other = run_cli_here("generate", "--calibration", str(out), "--models", "smollm2-135m", "hi")
    assert other.returncode == 1 and "was made for models" in other.stderr
    method = run_cli_here("generate", "--calibration", str(out), "--method", "adafuse", "hi")
    assert method.returncode == 1 and "chose method 'single'; drop --method adafuse" in method.stderr
    task = run_cli_here("eval", "--task", "nq", "--calibration", str(out), "--out", str(tmp_path / "x"))
    assert task.returncode == 1 and "calibrates task 'triviaqa', not 'nq'" in task.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(out.read_text().replace(f"anchor: {answer_models['right']}", "anchor: nobody"))
    b = run_cli_here("generate", "--calibration", str(bad), "hi")
    assert b.returncode == 1 and "nobody: not among the members" in b.stderr
    nosuch = run_cli_here("calibrate", "--task", "squad", "--models", "a,b", "--out", str(tmp_path / "c.yaml"))
    assert nosuch.returncode == 1 and "task squad has no dev split: give --dev-data FILE" in nosuch.stderr
    # a misspelt member fails before the members named before it run; a bad grid before anything
    right = answer_models["right"]
    typo = run_cli_here("calibrate", "--task", "triviaqa", "--models", f"{right},smollm2-135n", "--dev-data",
                        "triviaqa/rows.jsonl", "--data-dir", str(answer_data), "--out", str(tmp_path / "t.yaml"))  # fmt: skip
    assert typo.returncode == 1 and "unknown model 'smollm2-135n'" in typo.stderr and "smollm2-135m" in typo.stderr
    assert not (tmp_path / "t.runs").exists()
    grid = run_cli_here("calibrate", "--task", "triviaqa", "--models", f"{right},{right}x", "--thetas", "0.5,1.5",
                        "--out", str(tmp_path / "g.yaml"))  # fmt: skip
    assert grid.returncode == 1 and "calibrate: --thetas[1]: Input should be less than or equal to 1" in grid.stderr
    rule = run_cli_here("calibrate", "--task", "triviaqa", "--models", f"{right},{right}x", "--anchor-by", "best",
                        "--out", str(tmp_path / "r.yaml"))  # fmt: skip
    assert rule.returncode == 2 and "--anchor-by: invalid choice: 'best' (choose from" in rule.stderr
    loss = run_cli_here("calibrate", "--task", "triviaqa", "--models", f"{right},{right}x", "--max-loss", "-0.1",
                        "--out", str(tmp_path / "l.yaml"))  # fmt: skip
    assert loss.returncode == 1 and "calibrate: --max-loss: Input should be greater than or equal to 0" in loss.stderr


def test_a_task_without_a_dev_split_calibrates_on_its_own_test_file_named_test(answer_models, answer_data, tmp_path):
    """HumanEval's file lies inside an installed package: `--dev-data test` names it, the
    calibration records it as `test` (the same on every machine), and its rows are refused to eval."""
    out = tmp_path / "calib.yaml"
    models = ",".join(answer_models[n] for n in ("right", "wrong"))
    r = run_cli("calibrate", "--task", "humaneval", "--models", models, "--dev-data", "test", "--offset", "160",
                "--limit", "2", "--max-new-tokens", "2", "--data-dir", str(answer_data), "--out", str(out),
                "--thetas", "0.5", "--margins", "0", "--min-rows", "1", "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    cal = load_calibration(out)
    assert cal.dev.file == "test" and len(cal.dev.ids) == 2
    used = run_cli("eval", "--task", "humaneval", "--calibration", str(out), "--offset", "159", "--limit", "3",
                   "--data-dir", str(answer_data), "--out", str(tmp_path / "run"), "--no-progress")  # fmt: skip
    assert used.returncode == 1 and "2 of the 3 rows to evaluate" in used.stderr, used.stderr
    # a calibration of an older fuselm recorded the package file's absolute path: still recognised
    task = get_task("humaneval")
    old = tmp_path / "old.yaml"
    old.write_text(out.read_text().replace("file: test", f"file: {task.data_file}"))
    assert load_calibration(old).dev.file == task.data_file
    with pytest.raises(FuselmError, match="2 of the 3 rows to evaluate"):
        check_unused(old, EvalSpec(task="humaneval", models=[ModelConfig(name="m")], offset=159, limit=3), answer_data)
    missing = run_cli_here("calibrate", "--task", "triviaqa", "--models", models, "--dev-data", "nowhere.jsonl",
                           "--data-dir", str(answer_data), "--out", str(tmp_path / "c.yaml"))  # fmt: skip
    assert missing.returncode == 1 and "data file not found: nowhere.jsonl (nor under" in missing.stderr


def _dev_run(method: str, right: set[int], n: int = 30) -> RunView:
    """A TriviaQA dev run right on the rows in `right` (every metric 1 there, 0 elsewhere)."""
    rows = [{"id": i, "metrics": dict.fromkeys(("em", "f1", "paper_match"), float(i in right))} for i in range(n)]
    mean = len(right) / n
    summary = {"task": "triviaqa", "method": method, "models": ["m"] if method == "single" else ["m", "o"],
               "main_metric": "em", "n": n, "seconds_per_sample": 1.0, "metrics": dict.fromkeys(("em", "f1"), mean)}  # fmt: skip
    return RunView(method, summary, rows)


def test_significant_fuses_only_on_a_gain_the_dev_rows_are_sure_of():
    """The best member is right on rows 0-9. `noisy` is right on 16 rows (loses 6 of them, gains
    12): above it, its paired interval across 0; `steady` on 15 (gains 5, loses none): lower,
    but surely above. By default the higher one is chosen; with `significant` the sure one; and
    with neither sure, the best member alone."""
    task = get_task("triviaqa")
    best = _dev_run("single", set(range(10)))
    views = {"noisy": _dev_run("noisy", set(range(6, 22))), "steady": _dev_run("steady", set(range(15)))}
    tried = []
    for label, view in views.items():
        d = paired_difference(view, best, "em")
        tried.append(
            Trial(label=label, method="adafuse", models=["m", "o"], score=view.summary.main, versus_best=list(d))
        )
    assert tried[0].versus_best[1] < 0 < tried[1].versus_best[1]  # the premise: noisy unsure, steady sure
    assert choose(task, best, tried, views)[0] is tried[0]
    chosen, reason = choose(task, best, tried, views, significant=True)
    assert chosen is tried[1] and reason.startswith("steady scored 50.0 on the dev rows against 33.3 for m alone")
    chosen, reason = choose(task, best, tried[:1], views, significant=True)
    assert chosen is None
    assert reason.startswith("fall back to m alone (33.3): no fused setup's gain was significant on the dev rows")
    chosen, reason = choose(task, best, [], views)
    assert chosen is None and reason == "fall back to m alone (33.3): nothing was tried"


def test_max_loss_leaves_the_anchor_only_for_a_setup_that_cannot_lose_much_of_its_score():
    """The anchor is right on rows 0-5 (20%, as Qwen 1.5B on HumanEval's problems 82-111).
    `risky` is right on 7 rows, 4 of them the anchor's misses, and misses 3 of the anchor's: one
    row above it, its paired interval down to more than a tenth of 20 points below. `safe` adds
    one row and loses none. With max_loss 0.1 only `safe` may be chosen; with `risky` alone the
    anchor stays, and says why; with max_loss 1 the higher mean wins again."""
    task = get_task("triviaqa")
    best = _dev_run("single", set(range(6)))
    views = {"risky": _dev_run("risky", {3, 4, 5, 10, 11, 12, 13}), "safe": _dev_run("safe", set(range(7)))}
    tried = [Trial(label=label, method="adafuse", models=["m", "o"], score=view.summary.main,
                   versus_best=list(paired_difference(view, best, "em"))) for label, view in views.items()]  # fmt: skip
    assert tried[0].versus_best[1] < -0.1 * 0.2 <= tried[1].versus_best[1]  # the premise
    assert choose(task, best, tried, views, max_loss=0.1)[0] is tried[1]
    chosen, reason = choose(task, best, tried[:1], views, max_loss=0.1)
    assert chosen is None
    assert reason.startswith(
        "fall back to m alone (20.0): the fused setups that beat it on the dev rows may lose more than 10% of its"
        " score (best: risky, +3.3 ["
    ) and reason.endswith("the interval may reach -2.0)"), reason
    assert choose(task, best, tried[:1], views, max_loss=1.0)[0] is tried[0]
    assert choose(task, best, tried[:1], views)[0] is tried[0]  # no bound: an older calibration's rule
    assert choose(task, best, tried[:1], views, max_loss=math.inf)[0] is tried[0]  # `--max-loss inf`


def test_the_anchor_is_the_member_with_the_lowest_reference_nll_among_those_within_noise_of_the_best():
    """`small` solves 8 of 30 dev problems, `big` 6 (4 and 2 of them the other's misses): a
    lead the paired interval cannot tell from noise, so the NLL of the references decides;
    `weak`, lower still in NLL but far below (0 of 30), never anchors. By score, or without
    NLLs, the best dev score anchors."""
    task = get_task("triviaqa")
    alone = {"small": _dev_run("single", set(range(8))), "big": _dev_run("single", {0, 1, 2, 3, 20, 21}),
             "weak": _dev_run("single", set())}  # fmt: skip
    ranked = ["small", "big", "weak"]
    nll = {"small": 0.9, "big": 0.7, "weak": 0.5}
    d = paired_difference(alone["small"], alone["weak"], "em")
    assert d[1] > 0  # the premise: weak surely below
    anchor, why = choose_anchor(task, ranked, alone, nll)
    assert anchor == "big"
    assert why.startswith("big (20.0): the lowest reference NLL (0.700 per byte against 0.900) of the members"
                          " within noise of the best dev score, small (26.7), ahead by +6.7 [")  # fmt: skip
    assert choose_anchor(task, ranked, alone, nll, by="score") == ("small", "small (26.7): the best dev score")
    assert choose_anchor(task, ranked, alone, {**nll, "small": None})[0] == "small"
    anchor, why = choose_anchor(task, ranked, alone, {**nll, "big": 1.2})
    assert anchor == "small" and why.endswith("the lowest reference NLL of the 2 within noise of it")


# --- the learned controller --------------------------------------------------------------------------


def test_a_controller_learns_to_pick_the_right_member_where_the_vote_ties(answer_models, answer_data, tmp_path):
    """`wrong` comes first, so AdaFuse's tie goes to its " b b b"; a controller trained on dev
    rows along the references picks `right`'s " a a a", with the same features as in training."""
    from fuselm.fusion.controller import Controller, round_features

    models = f"{answer_models['wrong']},{answer_models['right']}"
    out = tmp_path / "ctrl.json"
    r = run_cli("train-controller", "--task", "triviaqa", "--models", models, "--data", "triviaqa/rows.jsonl",
                "--limit", "6", "--data-dir", str(answer_data), "--out", str(out), "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["rounds"] >= 6 and info["held_out_rows"] == 1
    assert info["held_out_accuracy"]["controller"] == 1.0
    assert info["held_out_accuracy"]["adafuse's own rule (these options)"] == 0.0
    gen = ["--models", models, "--method", "adafuse", "--raw", "--max-new-tokens", "3", "--json", "Question: x?"]
    plain = json.loads(run_cli("generate", *gen).stdout)
    assert plain["text"] == " b b b"
    g = run_cli("generate", *gen, "-O", f"controller={out}")
    assert g.returncode == 0, g.stderr
    steered = json.loads(g.stdout)
    assert steered["text"] == " a a a" and steered["trace"][0]["winner"] == 1
    # the features of that round at inference are the training examples' features
    names = steered["models"]
    first = steered["trace"][0]
    from fuselm.result import CandidateTrace

    rows = round_features([CandidateTrace(**c) for c in first["candidates"]], names, first["margins"], 0)
    example = json.loads((tmp_path / "ctrl.examples" / "examples.jsonl").read_text().splitlines()[0])
    assert example["rounds"][0]["features"] == rows
    # save and load again: the same file, the same choices
    ctl = Controller.load(out)
    ctl.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == json.loads(out.read_text())
    assert Controller.load(tmp_path / "again.json").choose(rows) == ctl.choose(rows) == 1
    # an eval run records the controller's absolute path: started with a relative one, it
    # resumes with the path spelled otherwise (from another directory)
    ev = ["eval", "--task", "triviaqa", "--models", models, "--method", "adafuse", "--data-dir", str(answer_data),
          "--data", str(answer_data / "triviaqa/rows.jsonl"), "--offset", "6", "--max-new-tokens", "3",
          "--out", str(tmp_path / "steered"), "--no-progress"]  # fmt: skip
    first = run_cli(*ev, "--limit", "1", "-O", "controller=ctrl.json", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    spec = json.loads((tmp_path / "steered" / "config.json").read_text())["spec"]
    assert spec["method_options"] == {"controller": str(out.resolve())}
    more = run_cli(*ev, "--limit", "2", "-O", f"controller={out}")
    assert more.returncode == 0, more.stderr
    summary = json.loads(more.stdout)
    assert summary["n"] == 2 and summary["metrics"]["em"] == 1.0  # right's answer, both rows
    # trained again with other options into the same file: its examples are not mixed, and the
    # run made with the first controller is not resumed with another
    again = run_cli("train-controller", "--task", "triviaqa", "--models", models, "--data", "triviaqa/rows.jsonl",
                    "--limit", "6", "--data-dir", str(answer_data), "--out", str(out), "--no-progress",
                    "-O", "theta=0.3")  # fmt: skip
    assert again.returncode != 0 and "examples collected with other options" in again.stderr
    info = json.loads(out.read_text())
    info["l2"] = 0.5  # any change of the file
    out.write_text(json.dumps(info))
    stale = run_cli(*ev, "--limit", "3", "-O", f"controller={out}")
    assert stale.returncode != 0 and "made with another controller" in stale.stderr, stale.stderr


def test_calibration_tries_a_controller_trained_on_the_dev_rows_after_its_own(answer_models, answer_data, tmp_path):
    """--controller-rows 3: a controller learns from dev rows 3-5, then the calibration on rows
    0-2 tries it beside the hand rules; eval refuses its rows as it refuses the calibration's."""
    out = tmp_path / "calib.yaml"
    models = f"{answer_models['wrong']},{answer_models['right']}"  # adafuse's tie goes to `wrong`
    common = ["--task", "triviaqa", "--models", models, "--dev-data", "triviaqa/rows.jsonl", "--max-new-tokens",
              "3", "--data-dir", str(answer_data), "--thetas", "0.5", "--margins", "0", "--max-gap", "100",
              "--min-rows", "1", "--no-progress"]  # fmt: skip
    r = run_cli("calibrate", *common, "--limit", "3", "--controller-rows", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    cal = load_calibration(out)
    ctl = tmp_path / "calib.controller.json"
    assert cal.dev.ids == [0, 1, 2] and cal.controller_dev.ids == [3, 4, 5]
    assert cal.controller_dev.file == "triviaqa/rows.jsonl" and cal.controller_dev.offset == 3
    tried = {t.label: t for t in cal.tried}
    assert tried["adafuse"].score == 0.0 and tried["adafuse controller"].score == 1.0
    assert tried["adafuse controller"].method_options == {"controller": str(ctl.resolve())}
    assert tried["adafuse controller"].models == [answer_models["wrong"], answer_models["right"]]
    # and only where the anchor is unsure (the anchor alone elsewhere)
    gated = tried["adafuse anchored controller theta=0.5"]
    assert gated.method_options == {"policy": "anchored", "anchor": cal.anchor, "theta": 0.5,
                                    "controller": str(ctl.resolve())}  # fmt: skip
    assert gated.score is not None and gated.n == 3
    # its training counts in the cost: a controller that took 100 s adds 100 s
    timed = json.loads(ctl.read_text())
    assert timed["info"]["seconds"] > 0
    timed["info"]["seconds"] += 100.0
    (tmp_path / "timed.json").write_text(json.dumps(timed))
    again = run_cli("calibrate", *common, "--limit", "3", "--controller", str(tmp_path / "timed.json"), "--out",
                    str(tmp_path / "timed.yaml"))  # fmt: skip
    assert again.returncode == 0, again.stderr
    t = load_calibration(tmp_path / "timed.yaml")
    runs = sum(m.seconds_per_sample * len(t.dev.ids) for m in t.scores) + sum(
        x.seconds_per_sample * x.n for x in t.tried
    )
    assert t.dev_seconds - runs == pytest.approx(timed["info"]["seconds"], abs=0.2)  # its runs' own time, and the 100 s
    used = run_cli("eval", "--task", "triviaqa", "--calibration", str(out), "--data-dir", str(answer_data),
                   "--data", str(answer_data / "triviaqa/rows.jsonl"), "--offset", "4", "--out",
                   str(tmp_path / "run"), "--no-progress")  # fmt: skip
    assert used.returncode == 1
    assert "2 of the 6 rows to evaluate (ids 4..5) were used to train the controller of" in used.stderr
    # a controller tried on the rows it learnt from: refused before any model loads
    own = run_cli("calibrate", *common, "--offset", "2", "--limit", "3", "--controller", str(ctl), "--out",
                  str(tmp_path / "own.yaml"))  # fmt: skip
    assert own.returncode == 1 and "learnt from 2 of these dev rows" in own.stderr
    assert not (tmp_path / "own.runs").exists()
    # the controller trained again on other rows (3-4), into the same file: the calibration's run
    # of the old one is set aside and made again, not resumed
    redo = run_cli("calibrate", *common, "--limit", "3", "--controller-rows", "2", "--out", str(out))
    assert redo.returncode == 0, redo.stderr
    assert load_calibration(out).controller_dev.ids == [3, 4]
    assert "a run of another controller file: moved to" in " ".join((redo.stdout + redo.stderr).split())
    # each run of the old controller: the plain one and the anchored one
    assert len(list((tmp_path / "calib.runs").glob("*controller*.superseded"))) == 2


def test_a_controller_file_is_checked(answer_models, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"fuselm_controller": 1, "kind": "forest"}')
    r = run_cli_here("generate", "--models", "smollm2-135m,smollm2-135m", "--method", "adafuse", "-O",
                     f"controller={bad}", "hi")  # fmt: skip
    assert r.returncode == 1 and "not a controller file of format 1" in r.stderr
    r = run_cli_here("generate", "--models", "smollm2-135m,smollm2-135m", "--method", "adafuse", "-O",
                     f"controller={tmp_path / 'none.json'}", "hi")  # fmt: skip
    assert r.returncode == 1 and "controller not found" in r.stderr and "fuselm train-controller" in r.stderr
    from fuselm.fusion.controller import Controller, feature_names

    names = ["a", "b"]
    n = len(feature_names(names))
    ctl = Controller(names, feature_names(names), [0.0] * n, [1.0] * n, [0.0] * n, 0.0, {})
    with pytest.raises(FuselmError, match=r"trained for 2 models \(a, b\), got 3"):
        ctl.check_models(["a", "b", "c"], "c.json")


def test_prompt_weights_favour_the_model_that_knows_the_prompt(smol_tokenizer_dir):
    """PackLLM's per-prompt weights: of two symmetric models (an exact tie without them), the
    one with the lower NLL of the prompt decides."""
    x = constant_model(smol_tokenizer_dir, {" a": 2.0, " b": 1.0}, "x")
    y = constant_model(smol_tokenizer_dir, {" b": 2.0, " a": 1.0}, "y")
    gen = GenerationConfig(max_new_tokens=2, chat="raw")

    def first(models, prompt, **opts):
        return generate(models, prompt, "adafuse", gen, {"branches": 1, **opts}).trace[0].text

    assert first([y, x], "start a a a a a") == " b"  # the tie goes to the first model
    assert first([y, x], "start a a a a a", prompt_weights=0.5) == " a"
    assert first([x, y], "start b b b b b", prompt_weights=0.5) == " b"
    assert generate([x, y], "start b b", "fixed-span", gen, {"prompt_weights": 0.5}).text.startswith(" b")
    with pytest.raises(Exception, match="prompt_weights"):
        first([x, y], "start", prompt_weights=0)


def test_prompt_weights_score_a_repeated_few_shot_prefix_once(tiny_backends, monkeypatch):
    """Per-prompt weights remember the pieces of the prompts they scored: the next row's prompt,
    the same shots before another question, costs its own text only (its session starts from
    the warm shots), its NLL is the one scored from scratch, and the session that generates
    next finds the whole prompt in the cache."""
    from fuselm.fusion.ensemble import PromptPieceMemo, prompt_nll

    backend = next(iter(tiny_backends.values()))
    forwarded = []
    for name in ("extend", "fork_branches"):
        run = getattr(backend, name)

        def counting(cache, *args, _run=run, _name=name, **kw):
            runs = args[-1] if _name == "fork_branches" else [args[0]]
            forwarded.append(sum(len(r) for r in runs))
            return _run(cache, *args, **kw)

        monkeypatch.setattr(backend, name, counting)
    model = as_model(backend)
    shots = "".join(f"Question: what is {i} and {i}?\nAnswer: {2 * i}.\n\n" for i in range(22))
    first, second = shots + "Question: who wrote Hamlet? Answer:", shots + "Question: where is Ulm? Answer:"
    assert 800 < len(shots) and len(backend.tokenize(second)) < backend.info.context_length

    forwarded.clear()
    alone = prompt_nll(model, second)  # no memo: every piece scored, from a cold side session
    cost_alone = sum(forwarded)
    memo = PromptPieceMemo()
    prompt_nll(model, first, memo)
    forwarded.clear()
    with model.session(second) as generation:  # opened first, as a generation's session is
        remembered = prompt_nll(model, second, memo)
        generation.next_logprobs()
        assert generation.stats.cached_prompt_tokens >= generation.stats.prompt_tokens - 1
    assert remembered == pytest.approx(alone, rel=1e-4)
    # the pieces are cut at blank lines: the shots' pieces are remembered whole, and only the
    # question is run (a token or so more: each new session runs its last token again to read
    # its next log-probs, and the blank line may tokenize with the question)
    question = len(backend.tokenize(second)) - len(backend.tokenize(shots))
    assert cost_alone > len(backend.tokenize(shots)) and sum(forwarded) <= question + 3
    # bounded: the oldest pieces go first
    small = PromptPieceMemo(capacity=2)
    prompt_nll(model, first, small)
    assert len(small) == 2


@pytest.mark.parametrize("combine, winner", [("mean", " b b"), ("median", " a"), ("trimmed", " a")])
def test_a_robust_combination_keeps_one_outlier_from_deciding(smol_tokenizer_dir, combine, winner):
    """Two models prefer " a" mildly; a third is sure of " b" and finds " a" all but impossible:
    its NLL outweighs both in the mean, not in the median or the trimmed mean."""
    x = constant_model(smol_tokenizer_dir, {" a": 2.0, " b": 1.0}, "x")
    y = constant_model(smol_tokenizer_dir, {" a": 2.0, " b": 1.0}, "y")
    z = constant_model(smol_tokenizer_dir, {" b": 9.0, " a": -20.0}, "z")
    gen = GenerationConfig(max_new_tokens=2, chat="raw")
    first = generate([x, y, z], "start", "adafuse", gen, {"branches": 1, "combine": combine}).trace[0]
    assert [c.text for c in first.candidates] == [" a", " b b"] and first.text == winner


# --- the race: blocks of dev rows, setups left behind, cost in the choice ---------------------------


@pytest.fixture(scope="module")
def race_data(tmp_path_factory):
    """8 rows whose every answer is "a a a" (the right model's)."""
    return answer_rows(tmp_path_factory.mktemp("race"), 8)


def test_the_race_leaves_a_setup_behind_after_the_block_that_shows_it_is_surely_worse(
    answer_models, race_data, tmp_path
):
    """`wrong` then `right`, both kept: equal-vote adafuse's tie goes to `wrong` (0 on every row)
    while `right` alone scores 1 on every row: after the first block of 4 rows its interval
    against the anchor (the best setup measured) lies below the loss bound, so it runs no further; the setups that follow
    `right` run on all 8 rows. Two looks: every interval at 1 - 0.05/2."""
    out = tmp_path / "calib.yaml"
    models = f"{answer_models['wrong']},{answer_models['right']}"
    r = run_cli("calibrate", "--task", "triviaqa", "--models", models, "--dev-data", "triviaqa/rows.jsonl",
                "--limit", "8", "--block-rows", "4", "--min-rows", "1", "--max-new-tokens", "3", "--data-dir",
                str(race_data), "--out", str(out), "--thetas", "0.5", "--margins", "0", "--max-gap", "100",
                "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    cal = load_calibration(out)
    tried = {t.label: t for t in cal.tried}
    assert cal.looks == 2 and cal.level == pytest.approx(1 - 0.05 / 2, abs=1e-6)
    assert tried["adafuse"].n == 4 and tried["adafuse"].score == 0.0
    # the anchor is the best setup measured: the loss bound says it first
    assert (
        tried["adafuse"].dropped
        == "surely more than the loss bound below the anchor (-100.0 [-100.0, -100.0]) after 4 rows"
    )
    assert tried["token-average"].n == 8 and tried["token-average"].dropped is None
    assert tried["adafuse anchored theta=0.5 margin=0"].n == 8
    runs = out.with_suffix(".runs")
    assert len((runs / _slug(f"adafuse {models.replace(',', '+')}") / "rows.jsonl").read_text().splitlines()) == 4
    assert all(t.cost is not None and t.cost > 0 for t in cal.tried)  # measured against the anchor, same rows
    assert cal.method == "single" and cal.models == [answer_models["right"]] and len(cal.dev.ids) == 8
    assert "out after 4 dev rows" in " ".join(r.stderr.split())
    # too few rows to decide anything: it says so, and runs the best member alone
    few = tmp_path / "few.yaml"
    r = run_cli("calibrate", "--task", "triviaqa", "--models", models, "--dev-data", "triviaqa/rows.jsonl",
                "--limit", "6", "--max-new-tokens", "3", "--data-dir", str(race_data), "--out", str(few),
                "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    cal = load_calibration(few)
    assert not cal.decided and cal.tried == [] and cal.models == [answer_models["right"]]
    assert cal.reason.startswith("6 dev rows are too few to tell setups apart (--min-rows 30)")


def test_among_setups_within_noise_of_the_best_the_cheapest_is_chosen():
    """`dear` is right on 16 of 30 rows, `cheap` on 15 (one row less: within noise of it): both
    surely above the anchor (10). Without costs the higher wins; with costs the cheaper one, and
    it says why; `--max-cost` leaves the dear one out; a setup surely below a member that is not
    the anchor is never chosen."""
    task = get_task("triviaqa")
    anchor = _dev_run("single", set(range(10)))
    views = {"dear": _dev_run("dear", set(range(16))), "cheap": _dev_run("cheap", set(range(15)))}

    def trials(costs):
        return [Trial(label=k, method="adafuse", models=["m", "o"], score=v.summary.main, cost=costs.get(k),
                      versus_best=list(paired_difference(v, anchor, "em"))) for k, v in views.items()]  # fmt: skip

    assert choose(task, anchor, trials({}), views)[0].label == "dear"
    chosen, reason = choose(task, anchor, trials({"dear": 2.5, "cheap": 1.3}), views)
    assert chosen.label == "cheap" and "at 1.30x its time; the cheapest within noise of dear (53.3, 2.50x)" in reason
    assert choose(task, anchor, trials({"dear": 1.2, "cheap": 1.3}), views)[0].label == "dear"
    chosen, _ = choose(task, anchor, trials({"dear": 2.5, "cheap": 3.0}), views, max_cost=2.0)
    assert chosen is None
    # a member (not the anchor) right on every row: both fused setups are surely below it
    members = {"m": anchor, "strong": _dev_run("single", set(range(30)))}
    assert choose(task, anchor, trials({}), views, members=members)[0] is None
