"""Multiple choice by fused likelihood: how `fuselm eval` runs a `multiple_choice` task.

Nothing is generated. For each row, every member scores each choice as a continuation of the
row's prompt (lm-eval's continuation: `target_delimiter + choice`), with its own tokenizer, in
one batched `session.score` call (one session per member per row; the same call on a model on
a serving engine, `RemoteSession.score`). A member's score of a choice is its string-level
log-probability: the sum of the log-probs of the tokens of tokenize(prompt + continuation)
after their longest common prefix with tokenize(prompt) (`DecodingSession.score`). Where the
prompt's last token merges with the continuation's start (a prompt ending in a space, a word
split differently), that boundary token is re-scored as part of the choice: the choice's
log-probability then also covers the piece of the prompt that the merged token spans, alike for
every choice of the row. Nothing is scored after the choice's last token (no end of sequence,
no delimiter). Different tokenizers thus score one string each, which is what makes members
with different vocabularies comparable.

The members' log-probabilities lp_i of a choice are fused by the method's rule, with weights w_i
(`-O weights=[...]`, else each model config's `weight`, 1):

* `product`: sum_i w_i lp_i / sum_i w_i, the weighted mean of the log-probabilities (a product of
  experts, normalised per choice, not over all strings);
* `mixture`: log(sum_i w_i exp(lp_i) / sum_i w_i), the log of the weighted mean of the
  probabilities (a mixture of experts);
* `single`: one model's own log-probability.

The row's answer is the choice of the highest fused log-likelihood (`acc`); `acc_norm` takes
the highest fused log-likelihood divided by the choice's length in characters, `acc_bytes` in
UTF-8 bytes: lm-eval's lengths, of the choice's text without the target delimiter. A tie goes
to the first choice (numpy's argmax, as lm-eval).

A fused score is an exact function of the members' own, so each member's score of each choice
is read from the memo of single-model work first (eval/memo.py) and kept there when computed: a
`product` run after its members' own runs on the same rows scores nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import GenerationConfig, validation_message
from ..conventions import OFFERS_SCORE
from ..errors import FuselmError
from ..fusion.methods import check_method
from ..models.prompts import Prompt
from ..models.session import Score
from ..result import unique_names
from .memo import Memo, score_key
from .records import EvalRow, Stopwatch, add_cpu
from .task import Task

MULTIPLE_CHOICE = "multiple_choice"

CHOICE_METHODS: dict[str, str] = {
    "single": "one model's log-likelihood of each choice",
    "product": "the weighted mean of the members' log-likelihoods (a product of experts)",
    "mixture": "the log of the weighted mean of the members' likelihoods (a mixture of experts)",
}
RULES = ("product", "mixture")


class ChoiceOptions(BaseModel):
    """Options of `product` and `mixture` (`single` takes none)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    weights: list[float] | None = Field(
        None, description="per-model weights of the rule (default: each model's `weight`, 1)"
    )


def is_multiple_choice(task: Task) -> bool:
    return task.output_type == MULTIPLE_CHOICE


def _methods_hint() -> str:
    return "single (one model), or product or mixture (several; -O weights=[W1,W2,...])"


def choice_options(method: str, n_models: int, options: dict[str, Any] | None) -> ChoiceOptions:
    """The validated options of a multiple-choice method (a one-line error otherwise)."""
    if method == "single":
        if options:
            raise FuselmError(f"method 'single' takes no options, got {', '.join(sorted(options))}")
        return ChoiceOptions()
    try:
        opts = ChoiceOptions(**(options or {}))
    except ValidationError as e:
        raise FuselmError(validation_message(e, f"options of method {method!r}", ChoiceOptions)) from None
    if opts.weights is not None and (len(opts.weights) != n_models or any(w <= 0 for w in opts.weights)):
        raise FuselmError(f"weights must be {n_models} positive numbers, one per model; got {opts.weights}")
    return opts


def check_choice_method(task: Task, method: str, n_models: int, options: dict[str, Any] | None) -> None:
    """What can be checked before any model loads: a multiple-choice task is scored by `single`,
    `product` or `mixture`; a generation method is refused with the ones that fit."""
    if method not in CHOICE_METHODS:
        raise FuselmError(
            f"task {task.label} is multiple_choice: its choices are scored, nothing is generated, so method"
            f" {method!r} does not apply; it runs with {_methods_hint()}"
        )
    if method == "single" and n_models != 1:
        raise FuselmError(
            f"method 'single' takes 1 model, got {n_models}: fuse several with --method product or mixture"
        )
    choice_options(method, n_models, options)


def check_generation_method(task: Task, method: str) -> None:
    """A multiple-choice rule named for a task that generates: refused by name."""
    if method in RULES:
        raise FuselmError(
            f"method {method!r} fuses the likelihoods of a multiple_choice task's choices; task {task.label} is"
            f" {task.output_type} (use a decoding method: `fuselm eval --help`)"
        )


def check_task_method(task: Task, method: str, n_models: int, options: dict[str, Any] | None) -> None:
    """Before any model loads: the method fits the task (a multiple-choice task's rules, or a
    decoding method for a task that generates), with its model count and options."""
    if is_multiple_choice(task):
        check_choice_method(task, method, n_models, options)
        return
    check_generation_method(task, method)
    check_method(method, n_models, options)


def fuse(logprobs: list[float], weights: list[float], rule: str) -> float:
    """The fused log-likelihood of one choice from each member's own (see the module's doc)."""
    if len(logprobs) != len(weights) or not logprobs:
        raise ValueError("one log-probability and one weight per member")
    total = sum(weights)
    if rule in ("single", "product"):
        if any(lp == -math.inf for lp in logprobs):
            return -math.inf
        return sum(w * lp for w, lp in zip(weights, logprobs)) / total
    if rule == "mixture":
        terms = [math.log(w) + lp for w, lp in zip(weights, logprobs)]
        top = max(terms)
        if top == -math.inf:
            return -math.inf
        return top + math.log(sum(math.exp(t - top) for t in terms)) - math.log(total)
    raise ValueError(f"unknown rule {rule!r} (rules: {', '.join(RULES)})")


def argmax(values: list[float]) -> int:
    """The first index of the largest value (numpy's argmax, as lm-eval takes it)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def predictions(fused: list[float], choices: list[str]) -> dict[str, int]:
    """The index each metric picks: `acc` the highest fused log-likelihood, `acc_norm` per
    character, `acc_bytes` per UTF-8 byte of the choice (without the target delimiter)."""
    chars = [len(c) for c in choices]
    nbytes = [len(c.encode("utf-8")) for c in choices]
    return {
        "acc": argmax(fused),
        "acc_norm": argmax([_per(lp, n) for lp, n in zip(fused, chars)]),
        "acc_bytes": argmax([_per(lp, n) for lp, n in zip(fused, nbytes)]),
    }


def _per(lp: float, n: int) -> float:
    # lm-eval divides by 0 for an empty choice (numpy: -inf, or nan for a log-prob of 0): -inf here
    return lp / n if n else -math.inf


@dataclass
class MemberScores:
    """One model's scores of a row's continuations, and what scoring them cost when it ran."""

    scores: list[Score]
    seconds: float
    forward_passes: int
    memo: bool = False  # read from the memo: nothing ran now
    cpu_seconds: float | None = None  # this process's CPU seconds (a model in process), as measured


def score_continuations(
    model: Any,
    prompt: Prompt,
    texts: list[str],
    gen: GenerationConfig,
    delimiter: str = "",
    memo: Memo | None = None,
    key: str | None = None,
) -> MemberScores:
    """The model's score of `delimiter + text` after its own rendering of `prompt` (raw or
    chat-templated per `gen.chat`), for every text in one batched call. After a chat template
    the text follows the assistant's turn header without the delimiter (lm-eval's rule with a
    chat template). Given the memo and the model's key there (`memo.model_key`), the scores are
    read from it when every one is there, and kept there when computed (each text with its
    share of the call's seconds and the call's forward passes)."""
    keys = [score_key(key, prompt, gen, delimiter, t) for t in texts] if memo is not None and key else []
    kept = memo.get_all(keys) if memo is not None and keys else None
    if kept is not None:
        scores = [Score(-math.inf if k["logprob"] is None else k["logprob"], k["n_tokens"], k["n_chars"], k["n_bytes"])
                  for k in kept]  # fmt: skip
        cpu = add_cpu(*(k.get("cpu_seconds") for k in kept))
        return MemberScores(scores, sum(k["seconds"] for k in kept), max(k["forward_passes"] for k in kept), True, cpu)
    text = model.prompt_text(prompt, gen)  # before the clock: it loads a deferred model
    lead = delimiter if text == prompt else ""
    watch = Stopwatch(cpu=model.works_in_process)
    session = model.session(text)
    try:
        scores = session.score([lead + t for t in texts])
    finally:
        session.close()
    seconds, cpu = watch.wall(), watch.cpu()
    if len(scores) != len(texts):
        raise FuselmError(f"{model.name!r} scored {len(scores)} of {len(texts)} continuations")
    passes = int(getattr(session.stats, "forward_passes", 0))
    if memo is not None and keys:
        memo.put({k: {"logprob": _finite(s.logprob, None), "n_tokens": s.n_tokens, "n_chars": s.n_chars,
                      "n_bytes": s.n_bytes, "seconds": seconds / len(texts), "forward_passes": passes,
                      "cpu_seconds": None if cpu is None else cpu / len(texts)}
                  for k, s in zip(keys, scores)})  # fmt: skip
    return MemberScores(scores, seconds, passes, cpu_seconds=cpu)


class ChoiceScorer:
    """A multiple-choice method over its models, built once for a run. With the memo
    (eval/memo.py) and each model's key there (None: not kept), a member's scores of a row are
    read from it when they are there: a fused run after its members' own runs scores nothing."""

    def __init__(
        self,
        method: str,
        models: list[Any],
        options: dict[str, Any] | None = None,
        memo: Memo | None = None,
        memo_keys: list[str | None] | None = None,
    ):
        opts = choice_options(method, len(models), options)
        if method not in CHOICE_METHODS:
            raise FuselmError(f"unknown multiple-choice method {method!r} (methods: {_methods_hint()})")
        for m in models:
            if OFFERS_SCORE not in m.offers:
                raise FuselmError(
                    f"multiple choice scores given continuations; {m.name!r} on {m.where}"
                    " does not (it gives no log-probabilities of a given text)"
                )
        self.method = method
        self.models = models
        self.names = unique_names([m.name for m in models])
        self.weights = list(opts.weights) if opts.weights is not None else [float(m.config.weight) for m in models]
        self.memo = memo
        self.memo_keys = memo_keys or [None] * len(models)

    def score_members(
        self, prompt: str, choices: list[str], gen: GenerationConfig, delimiter: str = ""
    ) -> list[MemberScores]:
        """Each member's scores of `delimiter + choice` after the prompt: the members one after
        another, each in one batched call (`score_continuations`)."""
        return [
            score_continuations(m, prompt, choices, gen, delimiter, self.memo, key)
            for m, key in zip(self.models, self.memo_keys)
        ]

    def member_scores(
        self, prompt: str, choices: list[str], gen: GenerationConfig, delimiter: str = ""
    ) -> tuple[list[list[Score]], dict[str, int]]:
        """[member][choice]: each member's score of `delimiter + choice` after the prompt, and
        each member's forward passes (`score_members`)."""
        members = self.score_members(prompt, choices, gen, delimiter)
        return [m.scores for m in members], {name: m.forward_passes for name, m in zip(self.names, members)}

    def fused(self, member: list[list[Score]]) -> list[float]:
        return [fuse([s[j].logprob for s in member], self.weights, self.method) for j in range(len(member[0]))]

    def row(self, task: Task, prefix: str, gen: GenerationConfig, row: dict[str, Any]) -> EvalRow:
        """One row of a run: every choice scored, the metrics, the choice `acc` picks. Its seconds
        are the members' scoring seconds, as measured when each ran (now, or when the memo kept
        them), summed: the members are scored one after another."""
        assert task.choices is not None and task.gold is not None
        prompt = task.build_prompt(prefix, row)
        choices = task.choices(row)
        gold = task.gold(row)
        golds = gold if isinstance(gold, list) else [gold]
        scored = self.score_members(prompt, choices, gen, task.target_delimiter)
        member = [m.scores for m in scored]
        fused = self.fused(member)
        picks = predictions(fused, choices)
        metrics = {name: float(picks[name] in golds) for name in task.metrics}
        per_choice = [
            {
                "text": c,
                "logprob": _finite(fused[j]),
                "members": {name: _finite(s[j].logprob) for name, s in zip(self.names, member)},
                "tokens": {name: s[j].n_tokens for name, s in zip(self.names, member)},
            }
            for j, c in enumerate(choices)
        ]
        pred = picks["acc"]
        return EvalRow(
            id=row["id"],
            prompt=prompt,
            output=choices[pred],
            answer=str(pred),
            reference=gold,
            metrics=metrics,
            seconds=round(sum(m.seconds for m in scored), 4),
            cpu_seconds=add_cpu(*(m.cpu_seconds for m in scored)),
            forward_passes={name: m.forward_passes for name, m in zip(self.names, scored)},
            finish_reason="scored",
            choices=per_choice,
            memo=all(m.memo for m in scored),
        )


def _finite(x: float, digits: int | None = 6) -> float | None:
    """A log-prob as JSON holds it (rounded to `digits`): -inf (a choice a member cannot write) as None."""
    return (x if digits is None else round(x, digits)) if math.isfinite(x) else None
