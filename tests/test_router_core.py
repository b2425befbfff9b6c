"""FusionRoute router core: the combination rule, the losses' gradients, routing learnt on a
synthetic task and the save/load round trip, all on tiny random Qwen2 backbones."""

from __future__ import annotations

import doctest
import json
import math

import pytest
import torch

from fuselm.errors import FuselmError
from fuselm.router import losses
from fuselm.router.losses import (
    cdpo_loss,
    combine_logprobs,
    informative_mask,
    routing_accuracy,
    sequence_logprob,
    sft_loss,
)
from fuselm.router.model import (
    META_FILE,
    WEIGHTS_FILE,
    RouterMeta,
    RouterModel,
    RouterOutput,
    add_lora,
    load_router,
    save_router,
)

VOCAB = 64


def tiny_backbone(seed: int = 0, vocab_size: int = VOCAB, hidden_size: int = 32):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def test_docstring_examples():
    assert doctest.testmod(losses).failed == 0


# --- combination rule -------------------------------------------------------------------------------


def test_combine_is_normalised_product():
    p_router = torch.tensor([0.7, 0.1, 0.2])
    p_expert = torch.tensor([0.4, 0.5, 0.1])
    combined = combine_logprobs(p_router.log(), p_expert.log())
    # By hand: products 0.28, 0.05, 0.02, sum 0.35.
    torch.testing.assert_close(combined.exp(), torch.tensor([0.8, 1 / 7, 2 / 35]))
    assert math.isclose(float(combined.exp().sum()), 1.0, rel_tol=1e-6)
    # The router can overrule the expert's own top choice.
    assert int(p_expert.argmax()) == 1 and int(combined.argmax()) == 0


def test_combine_batched_matches_rows():
    torch.manual_seed(0)
    r = torch.log_softmax(torch.randn(2, 3, 11), dim=-1)
    e = torch.log_softmax(torch.randn(2, 3, 11), dim=-1)
    combined = combine_logprobs(r, e)
    assert combined.shape == (2, 3, 11)
    torch.testing.assert_close(combined.exp().sum(-1), torch.ones(2, 3))
    product = r[1, 2].exp() * e[1, 2].exp()
    torch.testing.assert_close(combined[1, 2].exp(), product / product.sum())
    # Unnormalised inputs give the same result: only the product's shape matters.
    torch.testing.assert_close(combine_logprobs(r + 3.0, e - 1.0), combined)


# --- masks and positions ----------------------------------------------------------------------------


def test_informative_mask():
    greedy = torch.tensor(
        [
            [[5, 6, 7, 8], [1, 1, 1, 1]],  # expert 0
            [[5, 9, 7, 8], [1, 1, 2, 1]],  # expert 1
            [[5, 6, 7, 0], [1, 1, 1, 1]],  # expert 2
        ]
    )
    expected = torch.tensor([[False, True, False, True], [False, False, True, False]])
    assert torch.equal(informative_mask(greedy), expected)
    assert not informative_mask(greedy[:1]).any()  # one expert always agrees with itself


def test_sequence_logprob_convention():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[True, False, True, True, False], [False, False, False, False, True]])
    logprobs = torch.log_softmax(logits, dim=-1)
    # Token t+1 is scored by the logits at t; a mask on token 0 is ignored.
    expected = torch.stack(
        [logprobs[0, 1, ids[0, 2]] + logprobs[0, 2, ids[0, 3]], logprobs[1, 3, ids[1, 4]]],
    )
    torch.testing.assert_close(sequence_logprob(logits, ids, mask), expected)


def test_sft_loss_parts_by_hand():
    torch.manual_seed(0)
    B, T, E = 1, 4, 2
    ids = torch.tensor([[3, 1, 2, 0]])
    lm_logits = torch.randn(B, T, 5)
    route_logits = torch.randn(B, T, E)
    expert_lp = torch.log_softmax(torch.randn(B, T, E), dim=-1)
    target = torch.tensor([[False, False, True, True]])  # predictions at t = 1, 2
    informative = torch.tensor([[True, False, True, True]])  # t = 0 is not a target; t = 3 predicts nothing
    out = RouterOutput(lm_logits, route_logits)
    loss, parts = sft_loss(out, ids, target, expert_lp, informative, lam=0.5)

    lp = torch.log_softmax(lm_logits, dim=-1)
    lm = -(lp[0, 1, 2] + lp[0, 2, 0]) / 2
    w = torch.softmax(route_logits[0, 2], dim=-1)
    expert = -torch.log((w * expert_lp[0, 2].exp()).sum()) / 2  # summed, over the 2 target tokens
    assert parts["informative"] == 1
    assert math.isclose(parts["lm"], float(lm), rel_tol=1e-5)
    assert math.isclose(parts["expert"], float(expert), rel_tol=1e-5)
    torch.testing.assert_close(loss, lm + 0.5 * expert)

    # nothing informative: no expert term, and no gradient at all for the routing head
    lm_leaf, route_leaf = lm_logits.clone().requires_grad_(), route_logits.clone().requires_grad_()
    loss, parts = sft_loss(
        RouterOutput(lm_leaf, route_leaf), ids, target, expert_lp, torch.zeros(B, T, dtype=torch.bool)
    )
    assert parts["expert"] == 0.0 and parts["informative"] == 0
    loss.backward()
    assert lm_leaf.grad is not None and route_leaf.grad is None


def test_sft_loss_on_the_answer_window_equals_the_full_sequence_loss():
    """Training computes logits from the position predicting the first answer token on only; the
    loss, the parts and the gradients are those of the whole sequence with the prompt masked."""
    from fuselm.training.router_data import SFTExample
    from fuselm.training.router_train import answer_window, sft_tensors

    torch.manual_seed(0)
    router = RouterModel(tiny_backbone(), 2)
    prompt, target = [5, 9, 2, 7, 11, 3], [8, 1, 4]
    item = SFTExample(
        prompt_ids=prompt,
        target_ids=target,
        expert_logprobs=torch.log_softmax(torch.randn(3, 2), -1).tolist(),
        expert_greedy=[[8, 6, 4], [8, 1, 5]],  # disagree at the 2nd and 3rd answer tokens
        source="t:0",
    )
    x = sft_tensors(item)
    out = answer_window(router, x["ids"], x["start"])
    loss, parts = sft_loss(out, x["window_ids"], x["target_mask"], x["expert_lp"], x["informative"])
    window_grads = torch.autograd.grad(loss, [router.route_head.weight, *router.backbone.parameters()])

    # The same example over the whole sequence, tensors built by hand.
    T, s = len(prompt) + len(target), len(prompt) - 1
    full = router(input_ids=torch.tensor([prompt + target]))
    mask = torch.zeros(1, T, dtype=torch.bool)
    mask[0, len(prompt) :] = True
    expert_lp = torch.zeros(1, T, 2)
    expert_lp[0, s : s + 3] = torch.tensor(item.expert_logprobs)
    informative = torch.zeros(1, T, dtype=torch.bool)
    informative[0, s + 1 : s + 3] = True
    loss_full, parts_full = sft_loss(full, torch.tensor([prompt + target]), mask, expert_lp, informative)
    full_grads = torch.autograd.grad(loss_full, [router.route_head.weight, *router.backbone.parameters()])

    assert parts["informative"] == parts_full["informative"] == 2
    torch.testing.assert_close(out.lm_logits, full.lm_logits[:, s:])
    torch.testing.assert_close(loss, loss_full)
    for a, b in zip(window_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_routing_accuracy():
    route = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 5.0]]])
    best = torch.tensor([[0, 0, 0, 1]])
    assert routing_accuracy(route, best, torch.ones(1, 4, dtype=torch.bool)) == 0.75
    assert routing_accuracy(route, best, torch.tensor([[True, False, False, False]])) == 1.0
    assert math.isnan(routing_accuracy(route, best, torch.zeros(1, 4, dtype=torch.bool)))


# --- CDPO ---------------------------------------------------------------------------------------------


def _cdpo_grads(router: RouterModel, bias: float) -> tuple[float, list[torch.Tensor | None]]:
    """LM gradient norm and the route head's grads after one backward of cdpo_loss."""
    torch.manual_seed(1)
    chosen = torch.randint(0, VOCAB, (3, 10))
    rejected = torch.randint(0, VOCAB, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[:, :4] = False  # prompt tokens
    with torch.no_grad():
        ref_c = sequence_logprob(router(chosen).lm_logits, chosen, mask)
        ref_r = sequence_logprob(router(rejected).lm_logits, rejected, mask)
    router.zero_grad(set_to_none=True)
    pol_c = sequence_logprob(router(chosen).lm_logits, chosen, mask)
    pol_r = sequence_logprob(router(rejected).lm_logits, rejected, mask)
    expert_c = torch.full((3,), bias)
    expert_r = torch.zeros(3)
    cdpo_loss(pol_c, pol_r, ref_c, ref_r, expert_c, expert_r, beta=0.1).backward()
    grads = [p.grad for p in router.lm_parameters() if p.grad is not None]
    norm = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads))) if grads else 0.0
    return norm, [p.grad for p in router.head_parameters()]


@pytest.mark.parametrize("lora", [False, True])
def test_cdpo_leaves_route_head_alone(lora):
    router = RouterModel(tiny_backbone(), n_experts=3)
    if lora:
        add_lora(router, r=4, alpha=8)
        with torch.no_grad():  # LoRA's B starts at zero; make the adapters matter
            for p in router.lm_parameters():
                p.normal_(0, 0.1)
    router.eval()
    norm, head_grads = _cdpo_grads(router, bias=0.0)
    assert norm > 0
    assert all(g is None or not g.any() for g in head_grads)
    # An expert that already strongly prefers the chosen answer leaves little for the router to learn.
    biased_norm, _ = _cdpo_grads(router, bias=100.0)
    assert biased_norm < 0.01 * norm
    # The bias is a constant: a gradient through it would be wrong, so it must be detached.
    expert_c = torch.zeros(2, requires_grad=True)
    zero = torch.zeros(2)
    cdpo_loss(zero.requires_grad_(), zero, zero, zero, expert_c, zero).backward()
    assert expert_c.grad is None


def test_lora_trains_only_adapters_and_head():
    router = add_lora(RouterModel(tiny_backbone(), n_experts=2), r=4, alpha=8)
    lm = router.lm_parameters()
    trainable = {id(p) for p in router.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lm + router.head_parameters()}
    names = {n for n, p in router.backbone.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    assert any(".q_proj." in n for n in names) and any(".o_proj." in n for n in names)
    assert router.n_experts == 2 and router.vocab_size == VOCAB
    assert router.route_head.weight.dtype == torch.float32


# --- learning to route ----------------------------------------------------------------------------------


def test_sft_learns_synthetic_routing():
    """Expert 0 is right after tokens < V/2, expert 1 after the others; the router must learn this from
    the mixture likelihood alone."""
    router = RouterModel(tiny_backbone(seed=3), n_experts=2)
    gen = torch.Generator().manual_seed(0)
    good, bad = math.log(0.9), math.log(0.01)

    def batch(n: int):
        ids = torch.randint(0, VOCAB, (n, 16), generator=gen)
        best = (ids >= VOCAB // 2).long()  # expert for the prediction made at each position
        expert_lp = torch.where(torch.nn.functional.one_hot(best, 2).bool(), good, bad)
        return ids, best, expert_lp

    held_out, best, _ = batch(64)
    mask = torch.ones_like(held_out, dtype=torch.bool)
    mask[:, -1] = False  # the last position predicts nothing

    def accuracy() -> float:
        with torch.no_grad():
            return routing_accuracy(router(held_out).route_logits, best, mask)

    assert accuracy() < 0.75  # an untrained head is near chance (0.5)
    optimizer = torch.optim.Adam(router.parameters(), lr=3e-3)
    target = torch.ones(16, 16, dtype=torch.bool)
    informative = torch.ones(16, 16, dtype=torch.bool)
    for _ in range(80):
        ids, _, expert_lp = batch(16)
        loss, parts = sft_loss(router(ids), ids, target, expert_lp, informative)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert parts["informative"] == 16 * 15

    router.eval()
    assert accuracy() >= 0.9


# --- save / load -------------------------------------------------------------------------------------------


def _meta(router: RouterModel) -> RouterMeta:
    return RouterMeta(
        backbone="tiny-qwen2",
        experts=["alpha", "beta"],
        vocab_size=router.vocab_size,
        vocab_fingerprint="0" * 64,
        extra={"steps": 3},
    )


@pytest.mark.parametrize("lora", [False, True])
def test_save_load_round_trip(tmp_path, lora):
    from safetensors import safe_open

    base = tiny_backbone(seed=0)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    router = RouterModel(base, n_experts=2)
    if lora:
        add_lora(router, r=4, alpha=8)
    with torch.no_grad():
        for p in router.lm_parameters() + router.head_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    router.eval()
    save_router(router, tmp_path / "r", _meta(router))

    # Another seed's weights: without LoRA they must all come from the file, with LoRA the base does.
    fresh = tiny_backbone(seed=7)
    if lora:
        fresh.load_state_dict(base_state)
    loaded, meta = load_router(tmp_path / "r", fresh)
    loaded.eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        a, b = router(ids), loaded(ids)
    assert torch.equal(a.lm_logits, b.lm_logits)
    assert torch.equal(a.route_logits, b.route_logits)

    with safe_open(str(tmp_path / "r" / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
    assert {"route_head.weight", "route_head.bias"} <= keys
    if lora:
        assert all(k.startswith("route_head.") or "lora_" in k for k in keys)
        assert meta.lora == {
            "r": 4,
            "alpha": 8,
            "dropout": 0.0,
            "target_modules": ["k_proj", "o_proj", "q_proj", "v_proj"],
        }
    else:
        assert "backbone.model.embed_tokens.weight" in keys and meta.lora is None
    saved = json.loads((tmp_path / "r" / META_FILE).read_text())
    assert saved["experts"] == ["alpha", "beta"] and saved["extra"] == {"steps": 3}
    assert meta.experts == ["alpha", "beta"] and meta.vocab_size == VOCAB and meta.backbone == "tiny-qwen2"
    assert not [p.name for p in (tmp_path / "r").iterdir() if p.name not in (WEIGHTS_FILE, META_FILE)]

    with pytest.raises(FuselmError, match="vocabulary of 64 tokens"):
        load_router(tmp_path / "r", tiny_backbone(vocab_size=VOCAB + 8))
    with pytest.raises(FuselmError, match="shape"):
        load_router(tmp_path / "r", tiny_backbone(hidden_size=48))


def test_load_errors(tmp_path):
    with pytest.raises(FuselmError, match="does not exist"):
        load_router(tmp_path / "nowhere", tiny_backbone())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FuselmError, match="not a saved router"):
        load_router(tmp_path / "empty", tiny_backbone())
    # Saved without LoRA, loaded where the metadata claims LoRA: the tensor sets differ.
    router = RouterModel(tiny_backbone(), n_experts=2)
    save_router(router, tmp_path / "r", _meta(router))
    meta = json.loads((tmp_path / "r" / META_FILE).read_text())
    meta["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]}
    (tmp_path / "r" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(FuselmError, match="missing tensors"):
        load_router(tmp_path / "r", tiny_backbone())


def test_vocab_fingerprint(tiny_backends, tiny_dirs):
    """A vocabulary's fingerprint (stored with a router, checked against its experts) tells
    vocabularies apart and is the same for the same vocabulary loaded again."""
    from fuselm.models.backend import vocab_fingerprint
    from fuselm.models.hf import TransformersBackend

    fps = {arch: vocab_fingerprint(b) for arch, b in tiny_backends.items()}
    assert all(fp.startswith("probe:") for fp in fps.values())
    assert len(set(fps.values())) == len(fps)  # llama, qwen2, gemma3: three vocabularies
    for arch, d in tiny_dirs.items():
        assert vocab_fingerprint(TransformersBackend.from_directory(d, name="again")) == fps[arch]


def test_annotation_store_is_rewritten_only_to_drop_a_torn_line(tmp_path):
    from fuselm.errors import FuselmError
    from fuselm.training.router_data import JsonlStore, LeftOut, SFTRecord

    path = tmp_path / "sft.jsonl"
    store = JsonlStore(path, SFTRecord)
    store.append(LeftOut(source="nq:0", why="too long"))
    store.append(LeftOut(source="nq:1"))
    before = path.stat()
    lines = path.read_text().splitlines()
    again = JsonlStore(path, SFTRecord).items
    assert [(type(it), it.source, it.why) for it in again] == [(LeftOut, "nq:0", "too long"), (LeftOut, "nq:1", "")]
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # left alone
    with open(path, "a") as f:
        f.write('{"kind": "none", "source": "nq:2", "wh')  # a write cut by a kill
    assert [it.source for it in JsonlStore(path, SFTRecord).items] == ["nq:0", "nq:1"]
    assert path.read_text().splitlines() == lines
    assert not list(tmp_path.glob(".*.tmp"))
    # a whole line that is no record of this kind: refused, naming the file and the record
    with open(path, "a") as f:
        f.write('{"kind": "sft", "source": "nq:3"}\n')
    with pytest.raises(FuselmError, match=r"sft.jsonl, record 3: not an example of this version"):
        JsonlStore(path, SFTRecord)
