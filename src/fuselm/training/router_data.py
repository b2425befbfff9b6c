"""Training data for the router: task rows turned into token ids, annotated by the experts.

* SFT examples: a task prompt and its reference answer, with every expert's log-probability of
  each answer token and its greedy next token at that position (for the informative-position
  mask and the expert-mixture loss).
* Preference pairs: the experts' own sampled answers judged by the task's metric against the
  reference; a correct answer is *chosen*, an incorrect one for the same prompt *rejected*;
  both annotated by the experts the same way.

Annotation files are JSONL (token ids and floats, no pickle), appended and fsynced one example
at a time, so building a large set can be interrupted and resumed; each line is one of the
typed records below, validated when the file is read back.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar

import torch
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from ..config import GenerationConfig, StrictModel
from ..errors import FuselmError
from ..eval.task import Task, default_data_dir, load_rows
from ..eval.tasks import get_task
from ..files import append_jsonl, read_jsonl
from ..fusion.loop import decode
from ..fusion.methods import build_method
from ..models.backend import Backend


class AnnotatedAnswer(StrictModel):
    """Answer tokens after a prompt, with each expert's view of them."""

    prompt_ids: list[int]
    target_ids: list[int]
    expert_logprobs: list[list[float]]  # [T][E]: log p_i(target_t | prompt, target_<t)
    expert_greedy: list[list[int]]  # [E][T]: expert i's argmax at the position predicting target_t


class SFTExample(AnnotatedAnswer):
    kind: Literal["sft"] = "sft"
    source: str  # TASK:ROW_ID


class PreferencePair(StrictModel):
    chosen: AnnotatedAnswer
    rejected: AnnotatedAnswer
    kind: Literal["pref"] = "pref"
    source: str


class LeftOut(StrictModel):
    """A row with no example, remembered so that a resumed build skips it."""

    kind: Literal["none"] = "none"
    source: str
    why: str = ""


SFTRecord = Annotated[SFTExample | LeftOut, Field(discriminator="kind")]
PreferenceRecord = Annotated[PreferencePair | LeftOut, Field(discriminator="kind")]


def annotate(experts: list[Backend], prompt_ids: list[int], target_ids: list[int], caches: list) -> AnnotatedAnswer:
    """Each expert's log-prob and greedy token at every answer position (caches keep the prompt
    prefix between calls, so shared few-shot prefixes are run once)."""
    ids = prompt_ids + target_ids
    start = len(prompt_ids) - 1  # position whose output predicts target_ids[0]
    logprobs_by_expert, greedy = [], []
    for backend, cache in zip(experts, caches):
        held = backend.cached_ids(cache)
        k = 0
        while k < min(len(held), start) and held[k] == ids[k]:
            k += 1
        backend.truncate(cache, k)
        # Output rows only where they are needed: a full-vocabulary row costs about as much as
        # the rest of the pass for these small models.
        if k < start:
            backend.extend(cache, ids[k:start])
        rows = backend.extend(cache, ids[start:], all_logits=True)  # rows for positions start..
        rows = rows[: len(target_ids)]
        logprobs_by_expert.append(rows.gather(1, torch.tensor(target_ids)[:, None]).squeeze(1).tolist())
        greedy.append(rows.argmax(-1).tolist())
    per_token = [list(x) for x in zip(*logprobs_by_expert)]
    return AnnotatedAnswer(
        prompt_ids=list(prompt_ids), target_ids=list(target_ids), expert_logprobs=per_token, expert_greedy=greedy
    )


def new_caches(experts: list[Backend]) -> list:
    """One empty cache per expert, kept across `annotate` calls (the backend tracks what it holds)."""
    return [b.new_cache() for b in experts]


Record = TypeVar("Record", bound=BaseModel)


class JsonlStore(Generic[Record]):
    """Append-only JSONL of typed records (`record`: a model or an annotated union of models);
    each line fsynced, a torn last line dropped on reopen, every other line validated."""

    def __init__(self, path: Path, record: Any):
        self.path = path
        self._adapter = TypeAdapter(record)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.items: list[Record] = []
        for i, item in enumerate(read_jsonl(path), 1):
            try:
                self.items.append(self._adapter.validate_python(item))
            except ValidationError as e:
                raise FuselmError(
                    f"{path}, record {i}: not an example of this version ({e.errors()[0]['msg']}); delete the file"
                    " to build it again"
                ) from None

    def append(self, item: Record) -> None:
        append_jsonl(self.path, item.model_dump(mode="json"))
        self.items.append(item)


def _rows_to_build(task_name: str, rows: list[dict[str, Any]], store: JsonlStore, progress) -> Iterable:
    """(source key, row, stored item or None) for every row; every row ticks `progress` (if any) once."""
    done = {it.source: it for it in store.items}
    for row in rows:
        key = f"{task_name}:{row['id']}"
        yield key, row, done.get(key)
        if progress:
            progress()


def sft_ids(
    task: Task, prefix: str, row: dict[str, Any], tokenize: Callable[[str], list[int]]
) -> tuple[list[int], list[int]]:
    """Prompt and answer token ids of one SFT example; the answer ids are those of the whole text
    after the prompt's, so the prompt must tokenize the same alone and followed by the answer."""
    prompt = task.build_prompt(prefix, row)
    prompt_ids = tokenize(prompt)
    full = tokenize(prompt + task.reference_text(row))
    if full[: len(prompt_ids)] != prompt_ids:
        raise FuselmError(f"{task.name}:{row['id']}: the prompt's tokens change when the answer follows it")
    return prompt_ids, full[len(prompt_ids) :]


def build_sft(
    task_name: str,
    rows: list[dict[str, Any]],
    tokenize: Callable[[str], list[int]],
    experts: list[Backend],
    prefix: str,
    store: JsonlStore,
    max_length: int,
    progress: Callable[[], None] | None = None,
) -> None:
    """Annotate (and store) one SFT example per row not in the store yet. A row longer than
    `max_length` is stored as left out ("kind": "none"), not cut: a cut answer teaches a wrong
    ending."""
    task = get_task(task_name)
    caches = new_caches(experts)
    for key, row, stored in _rows_to_build(task_name, rows, store, progress):
        if stored is not None:
            continue
        prompt_ids, target_ids = sft_ids(task, prefix, row, tokenize)
        if len(prompt_ids) + len(target_ids) > max_length:
            store.append(LeftOut(source=key, why=f"longer than max_length {max_length}"))
            continue
        ex = annotate(experts, prompt_ids, target_ids, caches)
        store.append(SFTExample(**ex.model_dump(), source=key))


def check_stored_sft(
    task_name: str,
    rows: list[dict[str, Any]],
    tokenize: Callable[[str], list[int]],
    prefix: str,
    store: JsonlStore,
    max_length: int,
) -> None:
    """Refuse stored SFT examples that the current config and data would not build the same way
    (another prompt, answer format or `max_length`), instead of training on a mix."""
    task = get_task(task_name)
    for key, row, stored in _rows_to_build(task_name, rows, store, None):
        if stored is None:
            continue
        prompt_ids, target_ids = sft_ids(task, prefix, row, tokenize)
        if isinstance(stored, LeftOut):
            same = len(prompt_ids) + len(target_ids) > max_length
        else:
            same = stored.prompt_ids == prompt_ids and stored.target_ids == target_ids
        if not same:
            raise FuselmError(
                f"{store.path}: example {key} was built from another prompt, answer or max_length than "
                f"the current config and data give; delete {store.path} to build it again"
            )


def build_preferences(
    task_name: str,
    rows: list[dict[str, Any]],
    tokenize: Callable[[str], list[int]],
    experts: list,  # loaded Models (for sampling) whose backends annotate
    prefix: str,
    store: JsonlStore,
    samples: int,
    temperature: float,
    seed: int,
    progress: Callable[[], None] | None = None,
) -> None:
    """Sample answers from every expert, judge them against the reference, store one
    (correct, incorrect) pair per prompt that has both."""
    task = get_task(task_name)
    backends = [m.backend for m in experts]
    samplers = [build_method("single", [m]) for m in experts]
    caches = new_caches(backends)
    for key, row, stored in _rows_to_build(task_name, rows, store, progress):
        if stored is not None:
            continue
        prompt = task.build_prompt(prefix, row)
        judged: list[tuple[str, float]] = []
        for i in range(len(experts)):
            for k in range(samples):
                gen = GenerationConfig(
                    max_new_tokens=task.max_new_tokens,
                    temperature=temperature,
                    seed=(seed * 100003 + zlib.crc32(key.encode()) * 31 + i * 7 + k) % 2**31,
                    stop=list(task.stop),
                    chat="raw",
                )
                result = decode(samplers[i], prompt, gen)
                out = result.text
                score = task.score(out, row)[task.main_metric]
                # the answer as the model ended it: with the stop text when it stopped there
                ending = task.stop[0] if task.stop and result.finish_reason == "stop" else ""
                judged.append((out + ending, score))
        good = [o for o, s in judged if s > 0]
        bad = [o for o, s in judged if s <= 0 and o.strip()]
        prompt_ids = tokenize(prompt)
        ids = {o: tokenize(prompt + o) for o in good + bad}
        # an answer whose text changes how the prompt tokenizes cannot be scored after the prompt
        good, bad = ([o for o in side if ids[o][: len(prompt_ids)] == prompt_ids] for side in (good, bad))
        if not good or not bad:
            store.append(LeftOut(source=key, why="no correct and incorrect answer both"))
        else:
            rng = random.Random(f"{seed}:{key}")  # per row: a resumed build picks what a whole one would
            chosen, rejected = rng.choice(good), rng.choice(bad)
            pair = [annotate(backends, prompt_ids, ids[text][len(prompt_ids) :], caches) for text in (chosen, rejected)]
            store.append(PreferencePair(chosen=pair[0], rejected=pair[1], source=key))


def load_task_rows(task_name: str, data: str | None, data_dir: Path | None, limit: int | None) -> list[dict]:
    task = get_task(task_name)
    if data is None:
        if task.train_file is None:
            raise FuselmError(f"no default training file for task {task_name!r}; give `data: PATH`")
        data = str((data_dir or default_data_dir()) / task.train_file)
    rows = load_rows(task, data, data_dir)
    return rows[:limit] if limit else rows


def sft_items(store: JsonlStore) -> Iterable[SFTExample]:
    return (it for it in store.items if isinstance(it, SFTExample))


def pref_items(store: JsonlStore) -> Iterable[PreferencePair]:
    return (it for it in store.items if isinstance(it, PreferencePair))
