"""FusionRoute end to end on tiny models: train a router with the real CLI (annotation by the
experts, SFT, CDPO and mix phases, checkpoints, resume after a kill), then generate with it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from .conftest import SHARED_DATA, run_cli, save_tiny_model

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "nq").is_dir(), reason="needs ../shared/data")


@pytest.fixture(scope="module")
def qwen_experts(tiny_dirs, tmp_path_factory) -> list[Path]:
    """Two tiny Qwen2 models with different random weights (one vocabulary)."""
    from transformers import AutoTokenizer

    if "qwen2" not in tiny_dirs:
        pytest.skip("qwen tokenizer not installed")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dirs["qwen2"]))
    return [save_tiny_model("qwen2", tokenizer, seed, tmp_path_factory.mktemp(f"expert{seed}")) for seed in (1, 2)]


def _seed_pairs(out: Path, experts: list[Path], rows: int) -> None:
    """Preference pairs for the first NQ training rows (chosen: the reference; rejected: a wrong
    answer), annotated by the real experts. Random tiny experts never answer correctly, so the
    sampling step would find no pairs; the trainer treats stored pairs as already built."""
    from fuselm.eval.tasks import get_task
    from fuselm.models.hf import TransformersBackend
    from fuselm.training.router_data import (
        JsonlStore,
        PreferencePair,
        PreferenceRecord,
        annotate,
        load_task_rows,
        new_caches,
    )

    task = get_task("nq")
    backends = [TransformersBackend.from_directory(d) for d in experts]
    caches = new_caches(backends)
    tok = backends[0].tokenizer
    store = JsonlStore(out / "data" / "preference.jsonl", PreferenceRecord)
    prefix = task.prompt_prefix(SHARED_DATA, shots=0)
    for row in load_task_rows("nq", None, SHARED_DATA, rows):
        prompt = task.build_prompt(prefix, row)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        good = tok(prompt + " " + row["answer"][0] + "\n", add_special_tokens=False)["input_ids"][len(p) :]
        bad = tok(prompt + " banana\n", add_special_tokens=False)["input_ids"][len(p) :]
        pair = PreferencePair(
            chosen=annotate(backends, p, good, caches),
            rejected=annotate(backends, p, bad, caches),
            source=f"nq:{row['id']}",
        )
        store.append(pair)


def _config(tmp: Path, tiny_dirs, experts, out: Path, **extra) -> Path:
    cfg = {
        "backbone": str(tiny_dirs["qwen2"]),
        "experts": [str(e) for e in experts],
        "expert_backend": "transformers",
        "sft": [{"task": "nq", "limit": 8, "shots": 0}],
        "preference": [{"task": "nq", "limit": 5, "shots": 0, "samples": 1}],
        "schedule": [{"kind": "sft", "epochs": 1}, {"kind": "cdpo", "epochs": 1}, {"kind": "mix", "epochs": 1}],
        "lora": {"r": 4, "alpha": 8},
        "batch_size": 2,
        "lr": 1e-3,
        "checkpoint_every": 2,
        "data_dir": str(SHARED_DATA),
        "out": str(out),
        **extra,
    }
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(tiny_dirs, qwen_experts, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("router-run")
    out = tmp / "run"
    _seed_pairs(out, qwen_experts, 4)
    r = run_cli("train-router", "--config", str(_config(tmp, tiny_dirs, qwen_experts, out)), "--no-progress")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["preference_pairs"] >= 4 and summary["steps"] > 0
    assert 0.0 <= summary["routing_accuracy_informative"] <= 1.0
    assert 0.5 <= summary["majority_expert_accuracy"] <= 1.0
    assert (out / "router" / "router.safetensors").is_file()
    meta = json.loads((out / "router" / "router.json").read_text())
    assert meta["experts"] == [e.name for e in qwen_experts] and meta["lora"]["r"] == 4
    sft = [json.loads(line) for line in (out / "data" / "sft.jsonl").read_text().splitlines()]
    assert len(sft) == 8 and all(len(x["expert_logprobs"]) == len(x["target_ids"]) for x in sft)
    # The fifth preference row was sampled and judged (its row is also an SFT row: both are built).
    prefs = [json.loads(line) for line in (out / "data" / "preference.jsonl").read_text().splitlines()]
    assert [p["source"] for p in prefs] == [f"nq:{i}" for i in range(5)]
    return out / "router"


def test_generate_with_router_traces_each_token(trained, qwen_experts):
    models = ",".join(str(e) for e in qwen_experts)
    for method in ("fusionroute", "expert-route"):
        r = run_cli(
            "generate", "--method", method, "--router", str(trained), "--models", models,
            "--max-new-tokens", "6", "--raw", "--json", "Question: who wrote hamlet\nAnswer:",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        steps = res["trace"]
        assert steps and all(s["source"] in {e.name for e in qwen_experts} for s in steps)
        assert all(set(s["route"]) == {e.name for e in qwen_experts} for s in steps)
        assert "".join(s["text"] for s in steps) == res["text"]
        if method == "expert-route":  # no complementary logits: always the expert's own argmax
            assert not any(s["changed"] for s in steps)
        # Lazy catch-up: an expert runs one pass per token it is selected for, never per token it missed.
        for e in qwen_experts:
            picked = sum(s["source"] == e.name for s in steps)
            assert res["stats"]["forward_passes"][e.name] == picked
        # The router is one of the generation's sessions: its passes are counted like the experts'
        # (one prefill, then one per token but the last).
        router = [n for n in res["stats"]["forward_passes"] if n.startswith("router:")]
        assert len(router) == 1 and res["stats"]["forward_passes"][router[0]] == len(steps)


def test_fusionroute_equals_the_formula(trained, qwen_experts):
    """The first generated token is the argmax of log p_router + log p_expert for the routed expert."""
    from fuselm.config import GenerationConfig
    from fuselm.fusion.loop import generate
    from fuselm.models.loading import load_model
    from fuselm.models.session import DecodingSession
    from fuselm.router.backend import RouterBackend

    models = [load_model(str(e)) for e in qwen_experts]
    prompt = "Question: what is the capital of italy\nAnswer:"
    gen = GenerationConfig(max_new_tokens=1, chat="raw")
    res = generate(models, prompt, "fusionroute", gen, {"router": str(trained)})
    router = RouterBackend.load(trained)
    ids = router.tokenize(prompt)
    session = DecodingSession(router, prompt)
    lp_r = session.next_logprobs()
    e = int(torch.argmax(router.route_logits(session.cache, len(ids))))
    expert = models[e].backend
    lp_e = expert.extend(expert.new_cache(), expert.tokenize(prompt))
    want = int(torch.argmax(lp_r + lp_e))
    assert res.trace[0].source == models[e].name
    assert res.text == ("" if want in expert.info.eos_token_ids else expert.decode([want]))


def test_router_prefill_keeps_only_the_last_lm_logits_but_every_route(trained):
    """A prefill computes the LM head for its last position only; the result and every position's
    routing logits are the same as from a pass that computes all positions."""
    from fuselm.router.backend import RouterBackend

    router = RouterBackend.load(trained)
    ids = router.tokenize("Question: who wrote hamlet\nAnswer: William")
    last_cache, all_cache = router.new_cache(), router.new_cache()
    last = router.extend(last_cache, ids)
    routes_last = [router.route_logits(last_cache, p) for p in range(1, len(ids) + 1)]
    every = router.extend(all_cache, ids, all_logits=True)
    routes_all = [router.route_logits(all_cache, p) for p in range(1, len(ids) + 1)]
    assert last.shape == every[-1].shape and every.shape[0] == len(ids)
    torch.testing.assert_close(last, every[-1], rtol=1e-5, atol=1e-5)
    for a, b in zip(routes_last, routes_all, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_clear_errors(trained, qwen_experts, tiny_dirs):
    from fuselm.errors import FuselmError
    from fuselm.fusion.loop import generate
    from fuselm.models.loading import load_model

    e1, e2 = (load_model(str(e)) for e in qwen_experts)
    with pytest.raises(FuselmError, match="trained for experts"):
        generate([e2, e1], "x", "fusionroute", None, {"router": str(trained)})
    with pytest.raises(FuselmError, match="routes between 2 experts"):
        generate([e1, e2, e1], "x", "fusionroute", None, {"router": str(trained)})
    if "llama" in tiny_dirs:
        with pytest.raises(FuselmError, match="one vocabulary"):
            generate([e1, load_model(str(tiny_dirs["llama"]))], "x", "fusionroute", None, {"router": str(trained)})
    with pytest.raises(FuselmError, match="router"):
        generate([e1, e2], "x", "fusionroute", None, {"router": str(trained.parent / "nope")})


def test_resume_after_kill_matches_uninterrupted_run(tiny_dirs, qwen_experts, tmp_path):
    from safetensors.torch import load_file

    def start(out: Path) -> subprocess.Popen:
        if not (out / "data" / "preference.jsonl").is_file():
            _seed_pairs(out, qwen_experts, 4)
        cfg = _config(
            tmp_path,
            tiny_dirs,
            qwen_experts,
            out,
            checkpoint_every=1,
            sft=[{"task": "nq", "limit": 6, "shots": 0}],
            schedule=[{"kind": "sft", "epochs": 1}, {"kind": "mix", "epochs": 1}],
        )
        cmd = [sys.executable, "-m", "fuselm.cli", "train-router", "--config", str(cfg), "--no-progress"]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    whole = start(tmp_path / "whole")
    assert whole.wait(timeout=600) == 0

    cut = tmp_path / "cut"
    proc = start(cut)
    marker = cut / "checkpoint" / "trainer.json"
    deadline = time.time() + 600
    while not marker.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_done = json.loads(marker.read_text())["global_step"]
    total = json.loads((tmp_path / "whole" / "summary.json").read_text())["steps"]
    assert steps_done < total  # killed mid-run
    # as if the kill had come between the two renames of a checkpoint swap
    (cut / "checkpoint").rename(cut / "checkpoint.old")
    again = start(cut)
    assert again.wait(timeout=600) == 0
    assert f"at step {steps_done}" in again.stderr.read().decode()
    a = load_file(str(tmp_path / "whole" / "router" / "router.safetensors"))
    b = load_file(str(cut / "router" / "router.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_eval_harness_runs_router_methods(trained, qwen_experts, tmp_path):
    """fusionroute and oracle-route through `fuselm eval` (oracle-route gets each row's reference)."""
    models = ",".join(str(e) for e in qwen_experts)
    for method, extra in (("fusionroute", ["--router", str(trained)]), ("oracle-route", [])):
        out = tmp_path / method
        r = run_cli(
            "eval", "--task", "nq", "--method", method, "--models", models, *extra, "--limit", "2",
            "--max-new-tokens", "4", "--data-dir", str(SHARED_DATA), "--out", str(out), "--no-progress",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all("em" in row["metrics"] for row in rows)


def test_long_rows_are_left_out_and_stale_data_is_refused(tiny_dirs, qwen_experts, tmp_path):
    from transformers import AutoTokenizer

    from fuselm.eval.tasks import get_task
    from fuselm.training.router_data import load_task_rows, sft_ids

    out = tmp_path / "run"
    _seed_pairs(out, qwen_experts, 2)
    task, tok = get_task("nq"), AutoTokenizer.from_pretrained(str(tiny_dirs["qwen2"]))
    rows = load_task_rows("nq", None, SHARED_DATA, 6)
    prefix = task.prompt_prefix(SHARED_DATA, shots=0)
    lengths = [
        sum(map(len, sft_ids(task, prefix, r, lambda t: tok(t, add_special_tokens=False)["input_ids"]))) for r in rows
    ]
    max_length = sorted(lengths)[3]  # the two longest rows do not fit
    too_long = sum(n > max_length for n in lengths)
    assert too_long >= 1

    def train(**extra):
        cfg = dict(
            sft=[{"task": "nq", "limit": 6, "shots": 0}], schedule=[{"kind": "sft", "epochs": 1}], max_length=max_length
        )
        cfg.update(extra)
        return run_cli(
            "train-router", "--config", str(_config(tmp_path, tiny_dirs, qwen_experts, out, **cfg)), "--no-progress"
        )

    r = train()
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["sft_left_out_for_length"] == too_long
    stored = [json.loads(line) for line in (out / "data" / "sft.jsonl").read_text().splitlines()]
    assert sum(it["kind"] == "none" for it in stored) == too_long
    assert all(len(it["prompt_ids"]) + len(it["target_ids"]) <= max_length for it in stored if it["kind"] == "sft")
    # annotation kept from another prompt (one few-shot example) is refused, not mixed in; the
    # checkpoint, which would refuse the config change first, is removed as if never made
    import shutil

    shutil.rmtree(out / "checkpoint")
    r = train(sft=[{"task": "nq", "limit": 6, "shots": 1}])
    assert r.returncode != 0 and "built from another prompt" in r.stderr
