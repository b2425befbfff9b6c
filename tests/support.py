"""Helpers shared by several test files: constructed models whose next-token distribution is
fixed, and the data and task files written for them; a saved router with random adapters; a
process that holds a run directory's lock (fixtures shared by several files are in conftest.py;
engines in engine_support.py, the server in serve_support.py). No test file imports another."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from fuselm import ModelConfig
from fuselm.models.hf import TransformersBackend
from fuselm.models.loading import Model


def as_model(backend) -> Model:
    return Model(backend, ModelConfig(name=backend.info.name))


def constant_model(tokenizer_dir, logits: dict[str, float], name: str) -> Model:
    """A llama whose next-token distribution is the same everywhere: layers zeroed, lm_head set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.model.norm.weight.fill_(1.0)
        head = torch.full((len(tok),), -30.0)
        for text, value in logits.items():
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1, text
            head[ids[0]] = value
        model.lm_head.weight[:, 0] = head / 4.0  # RMSNorm scales the one-hot to sqrt(16) = 4
    return as_model(TransformersBackend(model, tok, name=name))


def answer_rows(root: Path, n: int) -> Path:
    """A data directory with TriviaQA's prompt file and `triviaqa/rows.jsonl`: `n` rows whose
    every answer is "a a a" (the `right` model's)."""
    (root / "triviaqa").mkdir()
    (root / "triviaqa" / "prompt.txt").write_text("Question: Say a.\nAnswer: a a a\n")
    rows = [{"question": f"Question number {i}?", "answer": ["a a a"]} for i in range(n)]
    (root / "triviaqa" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def write_task(directory: Path, rows: list[dict], **changes) -> Path:
    (directory / "data").mkdir(exist_ok=True)
    (directory / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "task": "toy-mc",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "data/test.jsonl"}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Q: {{q}}\nA:",
        "doc_to_choice": "options",
        "doc_to_target": "answer",
        **changes,
    }
    path = directory / "task.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in spec.items() if v is not None}, sort_keys=False))
    return path


def make_router(backbone: str, directory, lora_std: float, experts=("a", "b"), with_lora: bool = True, seed: int = 0):
    """A router over a real or tiny backbone with random LoRA adapters and routing head, saved."""
    from fuselm.models.backend import vocab_fingerprint
    from fuselm.models.loading import load_model
    from fuselm.router.model import RouterMeta, RouterModel, add_lora, save_router

    torch.manual_seed(seed)
    base = load_model(backbone, backend="transformers").backend
    router = RouterModel(base.model, len(experts))
    if with_lora:
        add_lora(router, r=4, alpha=8)
    with torch.no_grad():
        for name, p in router.backbone.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: the adapters would change nothing
                p.normal_(0, lora_std)
        router.route_head.weight.normal_(0, 0.05)
    meta = RouterMeta(
        backbone=backbone,
        experts=list(experts),
        vocab_size=router.vocab_size,
        vocab_fingerprint=vocab_fingerprint(base),
    )
    save_router(router, directory, meta)
    return directory


# A process that takes a DirLock. It imports fuselm.files alone (not the package, whose imports
# take seconds), says "ready", waits until the file named in argv exists ("-": no wait) so that
# several start together, holds the lock for a while and says what happened: "held PID" and
# "interval T0 T1" ("BOTH" if it found another holder's marker while holding), or "refused MESSAGE".
_LOCKER = """
import os, sys, time, types
pkg = types.ModuleType("fuselm")
pkg.__path__ = [sys.argv[1]]
sys.modules["fuselm"] = pkg
from fuselm.errors import FuselmError
from fuselm.files import DirLock

directory, go, hold = sys.argv[2], sys.argv[3], float(sys.argv[4])
print("ready", flush=True)
while go != "-" and not os.path.exists(go):
    pass
lock = DirLock(directory)
try:
    lock.acquire()
except FuselmError as e:
    print("refused", e, flush=True)
    sys.exit(0)
t0 = time.time()
print("held", os.getpid(), flush=True)
try:
    marker = os.open(os.path.join(directory, "holder"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
except FileExistsError:
    print("BOTH", flush=True)
    marker = None
time.sleep(hold)
if marker is not None:
    os.close(marker)
    os.unlink(os.path.join(directory, "holder"))
t1 = time.time()
lock.release()
print("interval", t0, t1, flush=True)
"""


def locker(directory: Path, go: str | Path, hold: float) -> subprocess.Popen:
    import fuselm.files

    package = str(Path(fuselm.files.__file__).parent)
    return subprocess.Popen(
        [sys.executable, "-c", _LOCKER, package, str(directory), str(go), str(hold)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
