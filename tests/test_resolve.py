"""One resolution of a run's configuration (fuselm.resolve) for the CLI, lm-eval's model_args and
`Ensemble.from_config`: a config file, what is given beside it, a calibration."""

from __future__ import annotations

import json

import pytest

import fuselm
from fuselm.errors import FuselmError
from fuselm.eval.tasks import get_task
from fuselm.resolve import resolve_run_config, with_model_settings

from .conftest import SHARED_DATA, run_cli_here


def test_values_given_beside_a_file_go_over_its_own(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "models: [a, {name: b, weight: 2}]\nmethod: token-average\nmethod_options: {theta: 0.5, anchor: a}\n"
        "generation: {max_new_tokens: 9, chat: auto}\n"
    )
    run = resolve_run_config(cfg, options={"theta": 0.7}, generation={"max_new_tokens": 3},
                             generation_defaults={"chat": "raw", "system": "s"})  # fmt: skip
    assert [m.name for m in run.models] == ["a", "b"] and run.models[1].weight == 2
    assert run.method == "token-average" and run.method_options == {"theta": 0.7, "anchor": "a"}
    # the file over the defaults, the given settings over the file
    assert (run.generation.max_new_tokens, run.generation.chat, run.generation.system) == (3, "auto", "s")
    other = resolve_run_config(cfg, models=["c"], method="single")
    assert [m.name for m in other.models] == ["c"] and other.method == "single"


def test_the_method_when_none_is_given():
    assert resolve_run_config(models=["a", "b"]).method == "single"  # RunConfig's default
    assert resolve_run_config(models=["a", "b"], method_for_several="adafuse").method == "adafuse"
    assert resolve_run_config(models=["a"], method_for_several="adafuse").method == "single"


def test_model_settings_go_where_they_fit():
    settings = {"threads": 2, "timeout_s": 5.0}
    assert with_model_settings("a", settings) == {"name": "a", "threads": 2}
    engine = with_model_settings("big=vllm:http://127.0.0.1:8100", settings)
    assert engine == {"name": "big", "engine": "vllm", "url": "http://127.0.0.1:8100", "timeout_s": 5.0}
    run = resolve_run_config({"models": ["a", "vllm:http://h:8000"]}, model_settings=settings)
    assert run.models[0].threads == 2 and not run.models[1].in_process and run.models[1].timeout_s == 5.0


def test_no_model_and_a_bad_value_are_one_line_errors(tmp_path):
    with pytest.raises(FuselmError, match="^no model given: use --model NAME"):
        resolve_run_config({})
    with pytest.raises(FuselmError, match="^nothing here$"):
        resolve_run_config({"method": "adafuse"}, no_model="nothing here")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [a]\ngeneration: {max_new_token: 3}\n")
    with pytest.raises(FuselmError, match=r"bad\.yaml: generation\.max_new_token: unknown key; did you mean"):
        resolve_run_config(bad)
    with pytest.raises(FuselmError, match="^model_args: models.0.weight"):
        resolve_run_config(models=[{"name": "a", "weight": 0}], where="model_args")


def test_an_ensemble_from_a_config_file_runs_its_setup_and_generation(tiny_dirs, tmp_path):
    d = tiny_dirs.get("llama") or next(iter(tiny_dirs.values()))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"models:\n  - name: {d}\ngeneration:\n  max_new_tokens: 3\n  chat: raw\n")
    with fuselm.Ensemble.from_config(cfg) as ens:
        assert ens.method.name == "single"
        first = ens.generate("Hello")
        longer = ens.generate("Hello", max_new_tokens=5)  # over the file's
    assert first.stats.new_tokens <= 3 and (longer.stats.new_tokens == 5 or longer.finish_reason != "length")
    model = fuselm.load_model(str(d))
    try:
        same = fuselm.generate(model, "Hello", max_new_tokens=3, chat="raw")
    finally:
        model.close()
    assert first.text == same.text
    with pytest.raises(FuselmError, match="Did you mean 'single'"):
        fuselm.Ensemble.from_config(cfg, method="singel")  # checked before any model loads


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
def test_an_eval_config_runs_each_task_with_its_own_resolved_setup_in_a_directory_each(tiny_dirs, tmp_path):
    d = tiny_dirs.get("llama") or next(iter(tiny_dirs.values()))
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"tasks: [nq, triviaqa]\nmodels: [{d}]\ngeneration: {{max_new_tokens: 2, chat: raw}}\n")
    out = tmp_path / "runs"
    done = run_cli_here("eval", "--config", str(cfg), "--data-dir", str(SHARED_DATA), "--limit", "1", "--no-progress",
                        "--no-memo", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    summaries = json.loads(done.stdout)
    assert [(s["task"], s["method"], s["n"]) for s in summaries] == [("nq", "single", 1), ("triviaqa", "single", 1)]
    for task in ("nq", "triviaqa"):
        spec = json.loads((out / f"{get_task(task).label}__single" / "config.json").read_text())["spec"]
        assert spec["generation"]["max_new_tokens"] == 2 and [m["name"] for m in spec["models"]] == [str(d)]
