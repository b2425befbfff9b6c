"""GSM8K's hook (`gsm8k.yaml`: `fuselm: {hook: gsm8k}`). References end in "#### N" (the original
format) or "Therefore, the answer is N" (the AdaFuse data): the reference is that final number,
and the text a model should write is the rationale in the shots' format, ending in \\boxed{N}."""

from __future__ import annotations

from ..metrics import gsm8k_exact, gsm8k_reference, lenient_gsm8k
from ..task import TaskHook


def _target(row) -> str:
    """The answer in the shots' format: "Let's think step by step", the rationale, "The answer is
    \\boxed{N}" (the rationale's own closing line, "#### N" or "Therefore, the answer is N", is replaced)."""
    lines = str(row["answer"]).strip().split("\n")
    if lines and (lines[-1].startswith("####") or lines[-1].lower().startswith("therefore, the answer is")):
        lines = lines[:-1]
    body = "\n".join(["Let's think step by step", *lines])
    return f"{body}\nThe answer is \\boxed{{{gsm8k_reference(row['answer'])}}}\n"


HOOK = TaskHook(
    name="gsm8k",
    description="GSM8K: the reference is the rationale's final number; exact and paper_match score the whole output",
    fields=("question", "answer"),  # a GSM8K row
    metrics={
        # the whole output, not the extracted answer: paper_match finds the reference's digits anywhere in it
        "exact": lambda out, ans, row: gsm8k_exact(out, gsm8k_reference(row["answer"])),
        "paper_match": lambda out, ans, row: lenient_gsm8k(out, gsm8k_reference(row["answer"])),
    },
    reference=gsm8k_reference,
    target=_target,
)
