"""A calibration file may come from someone else: applying it chooses the setup (members by
name, method, options) and never how a model is trusted or reached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fuselm.calibration import Calibration, DevRows, MemberScore, apply_calibration
from fuselm.config import ModelConfig, RunConfig
from fuselm.errors import FuselmError

from .conftest import run_cli_here


def _calibration(path: Path, members: list[dict], method: str = "single", **options) -> Path:
    """A calibration as `fuselm calibrate` writes it (Calibration.save), choosing `members`."""
    names = [m["name"] for m in members]
    Calibration(
        task="triviaqa",
        metric="em",
        dev=DevRows(file="triviaqa/rows.jsonl", limit=2, ids=[0, 1]),
        members=[ModelConfig(**m) for m in members],
        scores=[MemberScore(name=n, score=0.5) for n in names],
        anchor=names[0],
        models=names if method != "single" else names[:1],
        method=method,
        method_options=options,
    ).save(path)
    return path


def test_a_calibration_cannot_trust_remote_code_but_the_user_s_own_models_run(tiny_dirs, tmp_path):
    model = str(tiny_dirs.get("llama") or next(iter(tiny_dirs.values())))
    cal = _calibration(tmp_path / "calib.yaml", [{"name": model, "trust_remote_code": True}])
    assert "trust_remote_code: true" in cal.read_text()
    refused = run_cli_here("generate", "--calibration", str(cal), "--raw", "--max-new-tokens", "2", "Hi")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"fuselm: error: {cal}: a calibration cannot set trust_remote_code (member {model!r}); give the models"
        f" yourself with --models/--config ({model})"
    ]
    # the models given beside it: the user's entries are used, the calibration picks the names
    given = run_cli_here(
        "generate", "--calibration", str(cal), "--models", model, "--raw", "--max-new-tokens", "2", "--json", "Hi"
    )
    assert given.returncode == 0, given.stderr
    assert json.loads(given.stdout)["models"] == [Path(model).name]  # results name a directory by its last part
    assert apply_calibration({"models": [{"name": model}]}, cal)["models"] == [{"name": model}]  # not trusted
    # harmless local settings in a calibration are applied
    local = _calibration(tmp_path / "local.yaml", [{"name": model, "weight": 2.0, "trust_remote_code": False}])
    data = apply_calibration({}, local)
    assert data["models"] == [{"name": model, "weight": 2.0}]


def test_a_calibration_cannot_point_a_member_at_an_engine(tmp_path):
    far = {"name": "far", "engine": "vllm", "url": "http://evil.example:8000", "api_key_env": "OPENAI_API_KEY"}
    cal = _calibration(tmp_path / "calib.yaml", [far, {"name": "smollm2-135m"}], "adafuse")
    refused = run_cli_here("generate", "--calibration", str(cal), "Hi")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"fuselm: error: {cal}: a calibration cannot set engine (member 'far'); give the models yourself with"
        " --models/--config (far, smollm2-135m)"
    ]


def test_a_calibration_made_on_engine_experts_runs_with_the_user_s_entries(tmp_path):
    """`fuselm calibrate` records the entries it was given, engines' URLs included; the user who
    made it gives them again (here: other URLs, another key variable) and those are used."""
    made = [
        {"name": "big", "engine": "vllm", "url": "http://10.0.0.5:8000", "api_key_env": "BIG_KEY"},
        {"name": "small", "engine": "sglang", "url": "http://10.0.0.6:8000", "tokenizer": "/models/small"},
    ]
    cal = _calibration(tmp_path / "calib.yaml", made, "adafuse", policy="anchored", anchor="big")
    with pytest.raises(FuselmError, match="a calibration cannot set engine"):
        apply_calibration({}, cal)
    mine = [
        {"name": "small", "engine": "sglang", "url": "http://127.0.0.1:8031"},
        {"name": "big", "engine": "vllm", "url": "http://127.0.0.1:8100", "api_key_env": "MY_KEY"},
    ]
    cfg = RunConfig(**apply_calibration({"models": mine}, cal))
    assert [(m.name, m.url, m.api_key_env, m.tokenizer) for m in cfg.models] == [
        ("big", "http://127.0.0.1:8100", "MY_KEY", None),
        ("small", "http://127.0.0.1:8031", None, None),
    ]
    assert cfg.method == "adafuse" and cfg.method_options == {"policy": "anchored", "anchor": "big"}
    # through the command line's --models: the same entries
    cli = apply_calibration({"models": [{"name": "big", "engine": "vllm", "url": "http://127.0.0.1:8100"},
                                        {"name": "small", "engine": "sglang", "url": "http://127.0.0.1:8031"}]}, cal)  # fmt: skip
    assert [m["url"] for m in cli["models"]] == ["http://127.0.0.1:8100", "http://127.0.0.1:8031"]


def test_a_calibration_s_relative_controller_file_is_read_beside_it(tmp_path):
    where = tmp_path / "calibrations"
    where.mkdir()
    members = [{"name": "smollm2-135m"}, {"name": "qwen2.5-coder-0.5b"}]
    rel = _calibration(where / "calib.yaml", members, "adafuse", controller="calib.controller.json")
    assert apply_calibration({}, rel)["method_options"] == {"controller": str(where / "calib.controller.json")}
    absolute = _calibration(where / "abs.yaml", members, "adafuse", controller="/data/ctl.json")
    assert apply_calibration({}, absolute)["method_options"] == {"controller": "/data/ctl.json"}
    # an option given beside the calibration is the user's, read where the user is
    mine = apply_calibration({"method_options": {"controller": "mine.json"}}, rel)
    assert mine["method_options"] == {"controller": "mine.json"}


def test_a_serve_setup_refuses_such_a_calibration_too(tmp_path):
    from fuselm.serve.config import Setup

    cal = _calibration(tmp_path / "calib.yaml", [{"name": "far", "engine": "vllm", "url": "http://evil.example:1"}])
    with pytest.raises(FuselmError, match="a calibration cannot set engine"):
        Setup(id="s", calibration=str(cal))
    setup = Setup(id="s", calibration=str(cal), models=[{"name": "far", "engine": "vllm", "url": "http://127.0.0.1:1"}])
    assert setup.models[0].url == "http://127.0.0.1:1"
