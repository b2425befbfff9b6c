"""GSM8K, 4-shot chain of thought ending in \\boxed{N}; references end in "#### N" (original
format) or "Therefore, the answer is N" (the AdaFuse data)."""

from __future__ import annotations

from ..metrics import gsm8k_exact, gsm8k_extract, gsm8k_reference, lenient_gsm8k
from ..task import Task


def _prompt(prefix: str, row) -> str:
    return f"{prefix}\n\nQuestion: {row['question']}\n"


def _target(row) -> str:
    """The answer in the shots' format: "Let's think step by step", the rationale, "The answer is
    \\boxed{N}" (the rationale's own closing line, "#### N" or "Therefore, the answer is N", is replaced)."""
    lines = str(row["answer"]).strip().split("\n")
    if lines and (lines[-1].startswith("####") or lines[-1].lower().startswith("therefore, the answer is")):
        lines = lines[:-1]
    body = "\n".join(["Let's think step by step", *lines])
    return f"{body}\nThe answer is \\boxed{{{gsm8k_reference(row['answer'])}}}\n"


TASKS = [
    Task(
        name="gsm8k",
        description="GSM8K grade-school math, 4-shot chain of thought",
        fields=("question", "answer"),
        build_prompt=_prompt,
        extract=gsm8k_extract,
        reference=lambda row: gsm8k_reference(row["answer"]),
        metrics={
            "exact": lambda out, ans, row: gsm8k_exact(out, gsm8k_reference(row["answer"])),
            "paper_match": lambda out, ans, row: lenient_gsm8k(out, gsm8k_reference(row["answer"])),
        },
        # "\n\n\n": the shots are separated by one blank line, so two in a row only come from a
        # model padding after its answer (SmolLM2 writes newlines up to the token limit).
        stop=("\n\nQuestion:", "\nQuestion:", "\n\n\n"),
        max_new_tokens=256,
        data_file="gsm8k/test_0-499.jsonl",
        train_file="gsm8k/train_300.jsonl",
        dev_file="gsm8k/train_300.jsonl",
        prompt_file="gsm8k/prompt.txt",
        hub=("gsm8k", "main", "test"),
        main_metric="exact",
        target=_target,
    )
]
