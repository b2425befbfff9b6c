"""The router on llama.cpp: the same router as on transformers (LoRA adapters exported to a GGUF
adapter, routing head on llama.cpp's final hidden state), checked against transformers on real
bundled backbones, and the engine choice with its errors."""

from __future__ import annotations

import json

import pytest
import torch

from fuselm.errors import FuselmError
from fuselm.models import assets, llamacpp
from fuselm.models.backend import vocab_fingerprint
from fuselm.models.catalog import BUNDLED
from fuselm.models.loading import load_model
from fuselm.models.session import DecodingSession
from fuselm.router.backend import RouterBackend, llamacpp_unavailable_reason, load_router_backend
from fuselm.router.model import RouterMeta

from .conftest import requires_bundled, run_cli
from .support import make_router

needs_llamacpp = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python not installed")


def walk(backends, prompt: str, steps: int):
    """Greedy steps (chosen by the first backend) through sessions on every backend: per step,
    each backend's next-token log-probs and, where it is a router, its routing logits."""
    sessions = [DecodingSession(b, prompt) for b in backends]
    out = []
    for _ in range(steps):
        row = []
        for b, s in zip(backends, sessions):
            lp = s.next_logprobs()
            route = b.route_logits(s.cache, len(s.committed_ids())) if hasattr(b, "route_logits") else None
            row.append((lp, route))
        out.append(row)
        text = backends[0].decode([int(row[0][0].argmax())])
        for s in sessions:
            s.append(text)
    return out


@pytest.mark.integration
@pytest.mark.slow
@needs_llamacpp
@pytest.mark.parametrize(
    "backbone",
    [
        # llama: llama.cpp's converter permutes q/k rows, so the exported LoRA B must be permuted too
        pytest.param("smollm2-135m", marks=requires_bundled("smollm2-135m")),
        # qwen2: the bundled FusionRoute router backbone
        pytest.param("qwen2.5-coder-0.5b", marks=requires_bundled("qwen2.5-coder-0.5b")),
    ],
)
def test_llamacpp_router_matches_transformers(backbone, tmp_path):
    # Adapters large enough to move the LM far from the base model, small enough that the two
    # engines' rounding does not send the hidden states apart (passes for seeds 0-3 at 0.1).
    path = make_router(backbone, tmp_path / "router", lora_std=0.1)
    hf = load_router_backend(path, "transformers")
    lc = load_router_backend(path, "llamacpp")
    plain = load_model(backbone, backend="llamacpp").backend
    assert isinstance(hf, RouterBackend) and lc.info.backend == "llamacpp"
    try:
        rows = walk([hf, lc, plain], "Question: What is the capital of France?\nAnswer:", steps=6)
    finally:
        lc.close()
        plain.close()
    # Where transformers' top two tokens are not near a tie, llama.cpp picks the same token (a
    # near-tie may flip with the engines' rounding and thread count: 4 of 6 once agreed, not 5).
    clear = [(h[0], c[0]) for h, c, _ in rows if float(torch.topk(h[0], 2).values.diff().abs()) > 0.5]
    gap_engines, gap_lora, route_gap, route_scale = [], [], [], []
    for (lp_h, route_h), (lp_c, route_c), (lp_p, _) in rows:
        top = torch.topk(lp_h, 10).indices
        gap_engines.append(float((lp_h[top] - lp_c[top]).abs().mean()))
        gap_lora.append(float((lp_c[top] - lp_p[top]).abs().mean()))
        # Only differences between experts matter (softmax, argmax): compare centred logits.
        route_h, route_c = route_h - route_h.mean(), route_c - route_c.mean()
        route_gap.append(float((route_h - route_c).abs().max()))
        route_scale.append(float(route_h.abs().max()))
    # The adapters really are applied (and in the right layout): llama.cpp's router follows the
    # transformers router, far from the base model without them.
    assert len(clear) >= 3 and all(int(h.argmax()) == int(c.argmax()) for h, c in clear), len(clear)
    assert sum(gap_engines) * 3 < sum(gap_lora), (gap_engines, gap_lora)
    # The routing head reads the same hidden state (llama.cpp quantizes activations: close, not equal).
    assert max(route_gap) < 0.2 * max(route_scale), (route_gap, route_scale)


@pytest.mark.integration
@needs_llamacpp
@requires_bundled("smollm2-135m")
def test_router_engine_choice_and_errors(tmp_path, tiny_dirs):
    lora = make_router("smollm2-135m", tmp_path / "lora-router", lora_std=0.05)
    auto = load_router_backend(lora, "auto")
    try:
        assert auto.info.backend == "llamacpp"  # auto takes llama.cpp when it can run the router
    finally:
        auto.close()
    # A router whose whole backbone was trained has no adapters to put on a GGUF.
    full = make_router("smollm2-135m", tmp_path / "full-router", lora_std=0.0, with_lora=False)
    with pytest.raises(FuselmError, match="whole backbone"):
        load_router_backend(full, "llamacpp")
    assert load_router_backend(full, "auto").info.backend == "transformers"
    # A backbone that is a transformers directory has no GGUF.
    tiny = make_router(str(tiny_dirs["llama"]), tmp_path / "tiny-router", lora_std=0.05)
    with pytest.raises(FuselmError, match="neither a bundled model nor a .gguf"):
        load_router_backend(tiny, "llamacpp")
    with pytest.raises(FuselmError, match="unknown router engine"):
        load_router_backend(lora, "vllm")
    # The fingerprint stored with a router is the same whichever engine runs the vocabulary.
    engines = [load_model("smollm2-135m", backend=k).backend for k in ("llamacpp", "transformers")]
    assert vocab_fingerprint(engines[0]) == vocab_fingerprint(engines[1])


@needs_llamacpp
@requires_bundled("gemma3-270m")
def test_auto_router_engine_falls_back_where_the_lora_cannot_be_exported():
    """A LoRA router over gemma3 (a GGUF layout the exporter does not know) runs on transformers
    under `auto`, and `llamacpp` says why it cannot (before any weights are read)."""
    meta = RouterMeta(
        backbone="gemma3-270m",
        experts=["a", "b"],
        vocab_size=262144,
        vocab_fingerprint="probe:x",
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]},
    )
    reason = llamacpp_unavailable_reason(meta)
    assert reason is not None and "gemma3" in reason


@pytest.mark.integration
@pytest.mark.slow
@needs_llamacpp
@requires_bundled("smollm2-135m")
def test_cli_fusionroute_with_router_on_llamacpp(tmp_path):
    # Two copies of one model under two names (the bundled name and its GGUF file), so that the
    # trace shows which one the router picked.
    gguf = assets.ensure_gguf(BUNDLED["smollm2-135m"])
    experts = ("smollm2-135m", gguf.stem)
    router = make_router("smollm2-135m", tmp_path / "router", lora_std=0.05, experts=experts)
    args = ["generate", "--method", "fusionroute", "--router", str(router), "--models", f"smollm2-135m,{gguf}"]
    args += ["--max-new-tokens", "6", "--json", "What is the capital of France?"]
    runs = {}
    for engine in ("llamacpp", "transformers"):
        r = run_cli(*args, "-O", f"router_backend={engine}")
        assert r.returncode == 0, r.stderr
        runs[engine] = json.loads(r.stdout)
        trace = runs[engine]["trace"]
        assert runs[engine]["method"] == "fusionroute" and trace
        assert all(t["source"] in experts and set(t["route"]) == set(experts) for t in trace)
    # The two engines run the same router: same first token, routed to the same expert.
    first = [runs[e]["trace"][0] for e in ("llamacpp", "transformers")]
    assert first[0]["source"] == first[1]["source"] and first[0]["text"] == first[1]["text"]
    r = run_cli(*args, "-O", "router_backend=vllm")
    assert r.returncode != 0 and "router_backend" in r.stderr
