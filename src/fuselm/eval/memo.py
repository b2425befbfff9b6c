"""The memo of single-model work: what one model gave for one input, kept across runs, so that
a model alone runs once per row and every later evaluation or calibration of the same rows and
model (and every fused multiple-choice run over it) reads its answer instead.

What is kept, each under a key that names everything the answer depends on:

* a greedy generation by `single`: (the model's identity, the prompt, chat and system prompt,
  max_new_tokens, stop strings) -> the text, finish reason, new tokens, forward passes and the
  seconds it took. Sampling (temperature > 0) is never kept: another run must draw again.
* a scored continuation: (the model's identity, the prompt, chat and system prompt, the target
  delimiter, the text) -> its log-probability, tokens, characters, bytes, and its share of the
  seconds and forward passes of the batched call that scored it (multiple choice, eval/choice.py;
  the reference NLLs of `fuselm calibrate`).

A model's identity (`models.loading.identity`) is its reference and backend, the path, size and
modification time of each of its files, the settings that change its numbers, and the library
versions, plus `MEMO_FORMAT` here: a changed file or setting is another key, never a stale answer.
Models on serving engines are never kept: a served name and a URL do not pin the weights behind them.

The store is one SQLite file (`$FUSELM_MEMO`, default `memo.sqlite3` in fuselm's cache dir) in
WAL mode, so that several processes read and write it at once; values are JSON. It is bounded
(`$FUSELM_MEMO_MAX_MB`, default 512): past the bound the least recently used entries go.
Deleting the file (and its `-wal`, `-shm` companions) clears it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from .._version import __version__
from ..config import GenerationConfig, ModelConfig
from ..errors import FuselmError
from ..models.assets import cache_dir
from ..models.loading import identity
from ..models.prompts import Prompt

# Bump when fuselm changes what a model's run gives for the same inputs and files (how a
# continuation is tokenized and scored, how a generation stops): every earlier entry then misses.
MEMO_FORMAT = 1
DEFAULT_MAX_MB = 512.0


def memo_path() -> Path:
    """Where the memo lives: $FUSELM_MEMO, else memo.sqlite3 in fuselm's cache directory."""
    given = os.environ.get("FUSELM_MEMO")
    return Path(given).expanduser() if given else cache_dir() / "memo.sqlite3"


def _max_bytes() -> int:
    return int(float(os.environ.get("FUSELM_MEMO_MAX_MB") or DEFAULT_MAX_MB) * 1e6)


def digest(obj: Any) -> str:
    """A key: the SHA-256 of `obj` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def model_key(cfg: ModelConfig) -> str | None:
    """The memo's name for a model entry's identity (None: a model on an engine, never kept)."""
    ident = identity(cfg)
    return None if ident is None else digest({"format": MEMO_FORMAT, "fuselm": __version__, "model": ident})


def _prompt_settings(prompt: Prompt, gen: GenerationConfig) -> dict[str, Any]:
    # what turns the prompt into the model's text (its chat template, if any, is among its files)
    return {"prompt": prompt, "chat": gen.chat, "system": gen.system}


def generation_key(model: str, prompt: Prompt, gen: GenerationConfig) -> str | None:
    """The key of `single`'s greedy generation from `prompt`; None when it samples (never kept).
    top_p, top_k and the seed do not change a greedy generation, so they are not part of it."""
    if gen.temperature > 0:
        return None
    return digest({"kind": "generate", "model": model, **_prompt_settings(prompt, gen),
                   "max_new_tokens": gen.max_new_tokens, "stop": list(gen.stop)})  # fmt: skip


def score_key(model: str, prompt: Prompt, gen: GenerationConfig, delimiter: str, text: str) -> str:
    """The key of the model's log-probability of `delimiter + text` after `prompt` (the
    delimiter is dropped after a chat template: eval/choice.py)."""
    if gen.chat == "raw":  # the string scored is delimiter + text: one key however it is split
        delimiter, text = "", delimiter + text  # (a task file's " " + "Paris", lm-eval's "" + " Paris")
    return digest({"kind": "score", "model": model, **_prompt_settings(prompt, gen), "delimiter": delimiter,
                   "text": text})  # fmt: skip


class Memo:
    """The store: JSON values by key, shared by processes (SQLite, WAL). One object serves the
    threads of one run (one connection behind a lock)."""

    def __init__(self, path: Path | None = None, max_bytes: int | None = None):
        self.path = path or memo_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = _max_bytes() if max_bytes is None else max_bytes
        self._lock = threading.Lock()
        self._used: set[str] = set()  # hits, marked recently used at close (one write, not one per hit)
        self.hits = 0
        try:
            # a writer waits for another process's transaction up to `timeout` seconds
            self._db = sqlite3.connect(self.path, timeout=60.0, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL stays consistent through a crash; a power cut may lose the last entries, not the file
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS memo (key TEXT PRIMARY KEY, value TEXT NOT NULL,"
                " bytes INTEGER NOT NULL, used REAL NOT NULL)"
            )
        except sqlite3.Error as e:
            raise FuselmError(
                f"cannot open the memo {self.path}: {e} (delete it to start afresh, move it with $FUSELM_MEMO,"
                " or run with --no-memo)"
            ) from e

    def get(self, key: str | None) -> Any:
        """The value kept under `key`, or None."""
        if key is None:
            return None
        with self._lock:
            row = self._db.execute("SELECT value FROM memo WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            self._used.add(key)
            self.hits += 1
        return json.loads(row[0])

    def get_all(self, keys: list[str]) -> list[Any] | None:
        """The values of every key, or None when one is missing."""
        values = []
        for key in keys:
            value = self.get(key)
            if value is None:
                return None
            values.append(value)
        return values

    def put(self, items: dict[str, Any]) -> None:
        """Keep each value under its key."""
        now = time.time()
        rows = []
        for key, value in items.items():
            text = json.dumps(value, ensure_ascii=False)
            rows.append((key, text, len(key) + len(text.encode()), now))
        with self._lock:
            self._transaction(lambda db: db.executemany("INSERT OR REPLACE INTO memo VALUES (?, ?, ?, ?)", rows))

    def close(self) -> None:
        """Mark the hits as recently used, keep the store within its bound, close."""
        used, now = sorted(self._used), time.time()

        def tidy(db: sqlite3.Connection) -> None:
            db.executemany("UPDATE memo SET used = ? WHERE key = ?", [(now, k) for k in used])
            if db.execute("SELECT COALESCE(SUM(bytes), 0) FROM memo").fetchone()[0] > self.max_bytes:
                # the least recently used go first, down to 90% of the bound
                db.execute(
                    "DELETE FROM memo WHERE key NOT IN (SELECT key FROM (SELECT key, SUM(bytes) OVER"
                    " (ORDER BY used DESC, key) AS running FROM memo) WHERE running <= ?)",
                    (int(self.max_bytes * 0.9),),
                )

        with self._lock:
            try:
                self._transaction(tidy)
            finally:
                self._used.clear()
                self._db.close()

    def _transaction(self, work) -> None:
        # IMMEDIATE: take the write lock first, so that two writers queue instead of one failing
        self._db.execute("BEGIN IMMEDIATE")
        try:
            work(self._db)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM memo").fetchone()[0]

    def __enter__(self) -> Memo:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
