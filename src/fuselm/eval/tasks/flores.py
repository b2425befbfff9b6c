"""FLORES-200 translation, zero-shot instruction: en->de, de->en, en->ro."""

from __future__ import annotations

from ..metrics import corpus_chrf, corpus_spbleu, corpus_spbleu_rebuilt
from ..task import Task


def _prompt(prefix: str, row) -> str:
    return f"{prefix}\n{row['question']}\n"


def _extract(output: str) -> str:
    return output.strip().split("\n")[0].strip()


CORPUS = {
    # sacrebleu spBLEU, tokenize="flores200"; None when the SentencePiece model is not available offline
    "spbleu": corpus_spbleu(_extract),
    # the same with the FLORES-200 model rebuilt from NLLB's tokenizer.json (eval/flores_spm.py)
    "spbleu_rebuilt": corpus_spbleu_rebuilt(_extract),
    "chrf": corpus_chrf(_extract),
}

TASKS: list[Task] = []

for name, pair, prompt in [
    ("flores-en-de", "eng2deu", "flores_en2deu_prompt.txt"),
    ("flores-de-en", "deu2eng", "flores_deu2en_prompt.txt"),
    ("flores-en-ro", "eng2ron", "flores_en2ron_prompt.txt"),
]:
    TASKS.append(
        Task(
            name=name,
            description=f"FLORES-200 devtest {pair}, zero-shot",
            fields=("question", "answer"),
            build_prompt=_prompt,
            extract=_extract,
            reference=lambda row: row["answer"],
            metrics={},
            corpus_metrics=CORPUS,
            stop=("\n",),
            max_new_tokens=128,
            data_file=f"flores/{pair}_0-399.jsonl",
            prompt_file=f"flores/{prompt}",
            main_metric="chrf",
            chat="auto",
        )
    )
