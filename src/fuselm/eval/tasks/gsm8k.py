"""GSM8K, 4-shot chain of thought ending in \\boxed{N}; references end in "#### N" (original
format) or "Therefore, the answer is N" (the AdaFuse data)."""

from __future__ import annotations

from ..metrics import gsm8k_exact, gsm8k_extract, gsm8k_reference, lenient_gsm8k
from ..task import Task, register_task


def _prompt(prefix: str, row) -> str:
    return f"{prefix}\n\nQuestion: {row['question']}\n"


register_task(
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
        prompt_file="gsm8k/prompt.txt",
        hub=("gsm8k", "main", "test"),
        main_metric="exact",
    )
)
