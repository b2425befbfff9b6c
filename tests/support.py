"""Helpers shared by several test files: constructed models whose next-token distribution is
fixed, and the data and task files written for them (fixtures shared by several files are in
conftest.py)."""

from __future__ import annotations

import json
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
