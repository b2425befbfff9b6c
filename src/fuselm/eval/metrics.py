"""Metrics, strict and paper-compatible, side by side.

Strict: SQuAD-standard normalised exact match and token F1; GSM8K final-number equality;
sacrebleu spBLEU (tokenize="flores200"; offline, the same with a rebuilt FLORES-200 model, reported
apart as spbleu_rebuilt) and chrF for translation; HumanEval pass@1.

Paper-compatible ("lenient"): the rules of the AdaFuse evaluation, so numbers can be set beside
the paper's. QA: stop words removed, plurals and number words normalised, then containment in
either direction. GSM8K: the reference's digits contained in the output's digits. Known
distortions: containment lets "18" match "118", and "the" or an empty answer never match;
a long rambling answer that contains the reference counts as right.

>>> squad_em("The Eiffel Tower!", ["eiffel tower"])
1.0
>>> round(squad_f1("the big red dog", ["red dog"]), 3)  # precision 2/3, recall 1
0.8
>>> lenient_qa("two cats", ["2 cat"])
1.0
>>> lenient_gsm8k("so 118 apples", "18")  # a known distortion
1.0
>>> gsm8k_exact("The answer is \\\\boxed{1,234}", "1234")
1.0
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)

STOP_WORDS = frozenset(
    """a an the of in on at to for from by with and or is are was were be been it its this that
    these those as which who whom what when where why how do does did his her their our your my""".split()
)
NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = ARTICLES.sub(" ", s)
    return " ".join(s.split())


def squad_em(prediction: str, references: list[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def _f1(pred: str, ref: str) -> float:
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:
        return float(p == r)
    common = collections.Counter(p) & collections.Counter(r)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, references: list[str]) -> float:
    return max((_f1(prediction, r) for r in references), default=0.0)


def _lenient_tokens(s: str) -> str:
    words = []
    for w in normalize_answer(s).split():
        if w in STOP_WORDS:
            continue
        w = NUMBER_WORDS.get(w, w)
        if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
            w = w[:-1]
        words.append(w)
    return " ".join(words)


def lenient_qa(prediction: str, references: list[str]) -> float:
    p = _lenient_tokens(prediction)
    if not p:
        return 0.0
    for r in references:
        r = _lenient_tokens(r)
        if r and (r in p or p in r):
            return 1.0
    return 0.0


def first_line(output: str) -> str:
    """The first line of an output, stripped (a translation: FLORES)."""
    return output.strip().split("\n")[0].strip()


def first_line_answer(output: str) -> str:
    """The first line, stripped, a final period dropped (a short answer: NQ, TriviaQA, SQuAD)."""
    return first_line(output).rstrip(".").strip()


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _to_number(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def gsm8k_reference(answer: str) -> str:
    """The final number of a GSM8K rationale: after "#### " in the original format, else the
    last number of the last line ("Therefore, the answer is N", the format of the AdaFuse data)."""
    tail = answer.split("####")[-1] if "####" in answer else answer.strip().splitlines()[-1]
    nums = _NUMBER.findall(tail)
    return nums[-1].replace(",", "").rstrip(".") if nums else tail.strip()


def gsm8k_extract(output: str) -> str:
    r"""The answer in \boxed{...}, else the last number in the output."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", output)
    if boxed:
        m = _NUMBER.search(boxed[-1])
        return m.group(0).replace(",", "") if m else boxed[-1].strip()
    nums = _NUMBER.findall(output)
    return nums[-1].replace(",", "").rstrip(".") if nums else ""


def gsm8k_exact(output: str, reference: str) -> float:
    a, b = _to_number(gsm8k_extract(output)), _to_number(reference)
    return float(a is not None and b is not None and abs(a - b) < 1e-6)


def lenient_gsm8k(output: str, reference: str) -> float:
    ref = re.sub(r"\D", "", reference)
    return float(bool(ref) and ref in re.sub(r"\D", "", output))


def bootstrap_indices(n: int, n_boot: int = 1000, seed: int = 0):
    """Row indices of ``n_boot`` resamples (with replacement) of ``n`` rows, seeded, so the same
    rows always give the same interval; shared by per-sample and corpus metrics."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def percentile_interval(scores, level: float = 0.95) -> tuple[float, float]:
    import numpy as np

    tail = (1.0 - level) / 2 * 100
    return float(np.percentile(scores, tail)), float(np.percentile(scores, 100 - tail))


@dataclass(frozen=True)
class SacrebleuCorpusMetric:
    """A sacrebleu corpus metric (chrF, BLEU) over a task's extracted outputs, with a bootstrap
    interval over sentences.

    A corpus score is not a mean of sentence scores, so its interval resamples sentences and
    rescores each resample. Like sacrebleu's own bootstrap, it rescores from per-sentence match
    statistics, which are summed, so 1000 resamples cost one pass over the text (recomputing chrF
    1000 times would take about a minute per run).

    ``build`` makes the sacrebleu metric, or returns None where it cannot run here (spBLEU's
    SentencePiece model offline); ``segment`` is applied to outputs and references alike before
    scoring (the rebuilt FLORES-200 pieces). Empty outputs count, they are not dropped.

    >>> chrf = SacrebleuCorpusMetric(lambda: __import__("sacrebleu").metrics.CHRF())
    >>> chrf(["Hallo Welt", "gut"], ["Hallo Welt", "gut"])
    100.0
    >>> chrf.interval(["Hallo Welt", ""], ["Hallo Welt", "gut"], n_boot=200)[1]
    100.0
    """

    build: Callable[[], Any]
    extract: Callable[[str], str] = lambda text: text
    segment: Callable[[list[str]], list[str]] | None = None

    def _statistics(self, outputs: list[str], references: list[str]) -> tuple[Any, Any] | None:
        import numpy as np

        metric = self.build()
        if metric is None:
            return None
        hyps, refs = [self.extract(o) for o in outputs], list(references)
        if self.segment is not None:
            hyps, refs = self.segment(hyps), self.segment(refs)
        # the per-sentence statistics sacrebleu's corpus_score sums (and its bootstrap resamples)
        stats = np.asarray(metric._extract_corpus_statistics(hyps, [refs]), dtype=np.float64)
        return metric, stats

    def __call__(self, outputs: list[str], references: list[str]) -> float | None:
        got = self._statistics(outputs, references)
        if got is None:
            return None
        metric, stats = got
        return float(metric._compute_score_from_stats(stats.sum(axis=0)).score)

    def resampled(self, outputs: list[str], references: list[str], indices: Any) -> Any | None:
        """The corpus score of each resample: ``indices`` is (resamples, rows), row positions.
        Paired comparisons pass two runs the same indices."""
        import numpy as np

        got = self._statistics(outputs, references) if len(outputs) else None
        if got is None:
            return None
        metric, stats = got
        return np.array([metric._compute_score_from_stats(stats[i].sum(axis=0)).score for i in indices])

    def interval(
        self, outputs: list[str], references: list[str], n_boot: int = 1000, seed: int = 0
    ) -> tuple[float, float] | None:
        """95% percentile bootstrap interval of the corpus score, resampling sentences."""
        scores = self.resampled(outputs, references, bootstrap_indices(len(outputs), n_boot, seed))
        return None if scores is None else percentile_interval(scores)


def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()


def _spbleu_flores200():
    from sacrebleu.metrics import BLEU

    try:
        return BLEU(tokenize="flores200")
    except Exception:  # noqa: BLE001 - offline: sacrebleu cannot fetch the tokenizer model
        return None


def _bleu_on_rebuilt_pieces():
    from sacrebleu.metrics import BLEU

    from .flores_spm import load_rebuilt

    return BLEU(tokenize="none") if load_rebuilt() is not None else None


def _rebuilt_pieces(texts: list[str]) -> list[str]:
    from .flores_spm import load_rebuilt

    sp = load_rebuilt()
    return [" ".join(sp.encode(t, out_type=str)) for t in texts]


def corpus_chrf(extract: Callable[[str], str] = lambda t: t) -> SacrebleuCorpusMetric:
    return SacrebleuCorpusMetric(_chrf, extract)


def corpus_spbleu(extract: Callable[[str], str] = lambda t: t) -> SacrebleuCorpusMetric:
    """spBLEU with sacrebleu's FLORES-200 SentencePiece model; None when that model is not on disk
    (sacrebleu fetches it on first use, which needs the network)."""
    return SacrebleuCorpusMetric(_spbleu_flores200, extract)


def corpus_spbleu_rebuilt(extract: Callable[[str], str] = lambda t: t) -> SacrebleuCorpusMetric:
    """spBLEU as sacrebleu computes it (SentencePiece pieces joined by spaces, then BLEU on them),
    with the FLORES-200 model rebuilt from NLLB-200's tokenizer.json (see
    :mod:`fuselm.eval.flores_spm`); None when it has not been built."""
    return SacrebleuCorpusMetric(_bleu_on_rebuilt_pieces, extract, _rebuilt_pieces)
