"""Open-domain QA (NQ, TriviaQA) and extractive QA (SQuAD), few-shot, as in the AdaFuse evaluation."""

from __future__ import annotations

from ..metrics import lenient_qa, squad_em, squad_f1
from ..task import Task


def _answers(row) -> list[str]:
    a = row["answer"]
    return [a] if isinstance(a, str) else list(a)


def _extract(output: str) -> str:
    return output.strip().split("\n")[0].strip().rstrip(".").strip()


QA_METRICS = {
    "em": lambda out, ans, row: squad_em(ans, _answers(row)),
    "f1": lambda out, ans, row: squad_f1(ans, _answers(row)),
    "paper_match": lambda out, ans, row: lenient_qa(ans, _answers(row)),
}


def _inline(prefix: str, row) -> str:
    return f"{prefix}\n\nQuestion: {row['question']}\nAnswer:"


def _block(prefix: str, row) -> str:
    return f"{prefix}\n\nQuestion:\n{row['question']}\nAnswer:\n"


TASKS: list[Task] = []

for name, desc, data, train, dev, hub in [
    (
        "nq",
        "Natural Questions, open-domain, 5-shot",
        "nq/test_0-999.jsonl",
        "nq/train_1600.jsonl",
        "nq/train_1600.jsonl",
        ("nq_open", None, "validation"),
    ),
    (
        "triviaqa",
        "TriviaQA (wikipedia), 5-shot",
        "triviaqa/test_0-999.jsonl",
        None,
        "triviaqa/dev_1000-1999.jsonl",
        ("trivia_qa", "rc.wikipedia.nocontext", "validation"),
    ),
]:
    TASKS.append(
        Task(
            name=name,
            description=desc,
            fields=("question", "answer"),
            build_prompt=_inline,
            extract=_extract,
            reference=_answers,
            metrics=QA_METRICS,
            stop=("\n",),
            max_new_tokens=32,
            data_file=data,
            train_file=train,
            dev_file=dev,
            prompt_file=f"{name}/prompt.txt",
            hub=hub,
            main_metric="em",
        )
    )

TASKS.append(
    Task(
        name="squad",
        description="SQuAD extractive QA (context + question), 5-shot",
        fields=("question", "answer"),
        build_prompt=_block,
        extract=_extract,
        reference=_answers,
        metrics=QA_METRICS,
        stop=("\n",),
        max_new_tokens=32,
        data_file="squad/test_0-999.jsonl",
        prompt_file="squad/prompt.txt",
        hub=("squad", None, "validation"),
        main_metric="em",
    )
)
