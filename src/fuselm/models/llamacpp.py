"""llama.cpp backend through llama-cpp-python's low-level API.

The high-level ``Llama`` object keeps one sequence and (in 0.3.36) copies logits only with
``logits_all=True``, a [n_ctx, vocab] float array (2 GB for Gemma's 262k vocabulary at 2k
context). Here one context holds each session in its own sequence and scores candidate
branches in further sequences, which share the prefix's KV cells (``llama_memory_seq_cp`` on a
unified cache), in groups of at most 12 branches and 512 tokens, one ``llama_decode`` per group.
Up to four sessions can share one loaded model, each in its own sequence (its cache, owned by
the session). Logits are read only for the positions that need them.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..conventions import END_OF_TURN_TOKENS
from ..errors import FuselmError
from .backend import Backend, Forks, ModelInfo, usable_cpus

MAX_SESSIONS = 4  # sequences 0..3 hold sessions' caches
MAX_BRANCHES = 12  # sequences 4..15 score candidate branches


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def cpu_has_amx() -> bool:
    """Whether this CPU advertises AMX tiles (Linux's /proc/cpuinfo; elsewhere: no)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return any(line.startswith("flags") and " amx_tile" in line for line in f)
    except OSError:
        return False


@dataclass(eq=False)
class LlamaCppCache:
    seq: int
    ids: list[int]  # tokens held by the sequence
    free: Callable[[], None] | None = None  # frees the sequence, once (also when garbage-collected)

    @property
    def length(self) -> int:
        return len(self.ids)


class LlamaCppBackend(Backend):
    def __init__(
        self,
        gguf_path: str | Path,
        name: str | None = None,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        embeddings: bool = False,
    ):
        """`embeddings` also keeps the final hidden state of every position that returns logits
        (``llama_get_embeddings_ith``), as a router's head needs."""
        if not available():
            raise FuselmError(
                "the llama.cpp backend needs llama-cpp-python: `pip install 'fuselm[llamacpp]'` "
                "(it compiles from source, about 7 minutes)"
            )
        import llama_cpp
        from llama_cpp import _internals

        self._llama_cpp = llama_cpp
        path = Path(gguf_path)
        if not path.is_file():
            raise FuselmError(f"GGUF file not found: {path}")
        _quiet_logs(llama_cpp)
        model_params = llama_cpp.llama_model_default_params()
        # On a CPU with AMX, no "extra" weight buffers (AMX and repacked layouts): llama.cpp
        # 0.3.36's AMX matmul crashed (SIGSEGV in ggml_backend_amx_mul_mat) on the first decode of
        # the bundled Q4 models on such a Xeon; elsewhere the repacked kernels are kept (faster).
        model_params.use_extra_bufts = not cpu_has_amx()
        try:
            self._model = _internals.LlamaModel(path_model=str(path), params=model_params, verbose=False)
        except ValueError as e:
            raise FuselmError(f"cannot load {path}: not a valid GGUF model ({e})") from e
        threads = n_threads or usable_cpus()
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = 512
        params.n_ubatch = 512
        params.n_seq_max = MAX_SESSIONS + MAX_BRANCHES
        params.kv_unified = True  # branches share the prefix's cells
        params.swa_full = True  # sliding-window layers keep every cell, so any tail can be rolled back
        params.n_threads = threads
        params.n_threads_batch = threads
        if embeddings:
            params.embeddings = True
            params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE  # per position, not pooled
        self._ctx = _internals.LlamaContext(model=self._model, params=params, verbose=False)
        # Every pass runs on this one thread, whoever asks: llama.cpp keeps a spinning OpenMP team
        # per calling thread, so passes from changing threads run slower (docs/benchmarks.md), and
        # with a thread of its own the model can run beside another (fusion.experts).
        self._passes = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llamacpp-{path.stem}")
        self.threads_apart = threads
        self._batch = _internals.LlamaBatch(n_tokens=512, embd=0, n_seq_max=1, verbose=False)
        self._mem = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._vocab = self._model.vocab
        self.n_vocab = self._model.n_vocab()
        self._free_seqs = list(range(MAX_SESSIONS))
        self._branch_epoch = 0  # bumped by every branch run; forks and branch batches from older runs are stale
        self._kept_slots: list[int] = []  # branch sequences left in place for adoption or the next step
        meta = self._model.metadata()
        self._template = meta.get("tokenizer.chat_template")
        self._add_bos = bool(self._model.add_bos_token())
        bos = self._model.token_bos()
        eos = {i for i in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, i)}
        for tok in END_OF_TURN_TOKENS:  # same end-of-turn set as the transformers backend
            ids = self._model.tokenize(tok.encode(), False, True)
            if len(ids) == 1:
                eos.add(ids[0])
        self.info = ModelInfo(
            name=name or path.stem,
            backend="llamacpp",
            architecture=meta.get("general.architecture", "?"),
            vocab_size=self.n_vocab,
            context_length=min(n_ctx, self._model.n_ctx_train()),
            eos_token_ids=frozenset(eos),
            bos_token_id=bos if self._add_bos else None,
            has_chat_template=bool(self._template),
            source=str(path),
        )

    # --- text ---------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), self._add_bos, True)

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if not ids:
            return ""
        arr = (self._llama_cpp.llama_token * len(ids))(*ids)
        size = 64 + 64 * len(ids)
        buf = ctypes.create_string_buffer(size)
        n = self._llama_cpp.llama_detokenize(self._vocab, arr, len(ids), buf, size, False, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._llama_cpp.llama_detokenize(self._vocab, arr, len(ids), buf, -n, False, True)
        return buf.raw[:n].decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if not self._template:
            raise FuselmError(f"model {self.info.name!r} has no chat template; use --raw")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        bos = self.decode([self._model.token_bos()]) if self._model.token_bos() >= 0 else ""
        eos = self.decode([self._model.token_eos()]) if self._model.token_eos() >= 0 else ""
        text = env.from_string(self._template).render(
            messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos
        )
        if self._add_bos and bos and text.startswith(bos):
            text = text[len(bos) :]
        return text

    # --- forward passes -------------------------------------------------------------------------
    def new_cache(self) -> LlamaCppCache:
        """A cache is one llama.cpp sequence, freed by :meth:`release` (or when the cache object
        is garbage-collected)."""
        if not self._free_seqs:
            raise FuselmError(f"at most {MAX_SESSIONS} live sessions per llama.cpp model")
        seq = self._free_seqs.pop(0)
        self._llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)
        cache = LlamaCppCache(seq, [])
        cache.free = weakref.finalize(cache, self._free_seq, seq)
        return cache

    def _free_seq(self, seq: int) -> None:
        if self._ctx.ctx is None:
            return
        self._llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)
        self._free_seqs.append(seq)

    def release(self, cache: LlamaCppCache) -> None:
        if cache.free is not None:
            cache.free()

    def can_keep(self, cache: LlamaCppCache) -> bool:
        # Kept only when no other session is live: its cells would otherwise sit among theirs
        # (the layout llama.cpp 0.3.36 gets wrong, see _compact).
        return bool(cache.ids) and len(self._free_seqs) == MAX_SESSIONS - 1

    def revive(self, cache: LlamaCppCache) -> bool:
        # Reused only when no other session is live and the sequence holds exactly its ids (a
        # decode interrupted between llama.cpp and the bookkeeping would break that).
        consistent = bool(cache.ids) and (
            self._llama_cpp.llama_memory_seq_pos_max(self._mem, cache.seq) + 1 == len(cache.ids)
        )
        return consistent and len(self._free_seqs) == MAX_SESSIONS - 1 and self._compact(cache.seq)

    def _compact(self, seq: int) -> bool:
        """Rewrite the cache so that `seq` (the only sequence left) holds the first cells in order.

        llama.cpp 0.3.36 (unified cache) was seen to compute wrong logits when a sequence kept a
        prefix in cells after freed ones (another sequence's, released) and decoded new tokens
        into those earlier cells: 0.4 off a full recomputation. Saving the sequence, clearing the
        whole cache and restoring it gives the layout that a single session has, which is exact.
        Only used when no other session is live; costs a copy of the prefix's key/values.
        False (and an empty cache) when llama.cpp cannot restore it.
        """
        lc = self._llama_cpp
        size = lc.llama_state_seq_get_size(self._ctx.ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        n = lc.llama_state_seq_get_data(self._ctx.ctx, buf, size, seq)
        lc.llama_memory_clear(self._mem, True)
        self._kept_slots = []
        self._branch_epoch += 1
        if n == 0 or lc.llama_state_seq_set_data(self._ctx.ctx, buf, n, seq) == 0:
            lc.llama_memory_seq_rm(self._mem, seq, -1, -1)
            return False
        return True

    def cached_ids(self, cache: LlamaCppCache) -> list[int]:
        return list(cache.ids)

    def truncate(self, cache: LlamaCppCache, length: int) -> None:
        if length < cache.length:
            self._llama_cpp.llama_memory_seq_rm(self._mem, cache.seq, length, -1)
            del cache.ids[length:]

    def _decode(self, tokens: list[int], positions: list[int], seqs: list[list[int]], logits: list[bool]) -> None:
        b = self._batch.batch
        b.n_tokens = len(tokens)
        for i, (t, p, s, lg) in enumerate(zip(tokens, positions, seqs, logits)):
            b.token[i] = t
            b.pos[i] = p
            b.n_seq_id[i] = len(s)
            for k, sid in enumerate(s):
                b.seq_id[i][k] = sid
            b.logits[i] = lg
        rc = self._passes.submit(self._llama_cpp.llama_decode, self._ctx.ctx, b).result()
        if rc != 0:
            raise FuselmError(f"llama_decode failed with code {rc} (context of {self.info.context_length} full?)")

    def _logits(self, i: int) -> torch.Tensor:
        ptr = self._llama_cpp.llama_get_logits_ith(self._ctx.ctx, i)
        arr = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return torch.log_softmax(torch.from_numpy(arr.copy()), dim=-1)

    def extend(self, cache: LlamaCppCache, ids: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        ids = list(ids)
        # Branch sequences kept for adoption must be gone before a session decodes: with them
        # still holding cells, llama.cpp 0.3.36 was seen to compute wrong logits for the session.
        self._clear_kept()
        if cache.length + len(ids) > self.info.context_length:
            raise FuselmError(f"context of {self.info.name!r} is full ({self.info.context_length} tokens)")
        rows = []
        for start in range(0, len(ids), 512):
            chunk = ids[start : start + 512]
            last_chunk = start + 512 >= len(ids)
            flags = [all_logits or (last_chunk and i == len(chunk) - 1) for i in range(len(chunk))]
            pos = [cache.length + i for i in range(len(chunk))]
            self._decode(chunk, pos, [[cache.seq]] * len(chunk), flags)
            cache.ids.extend(chunk)
            if all_logits:
                rows.extend(self._logits(i) for i in range(len(chunk)))
            elif last_chunk:
                rows.append(self._logits(len(chunk) - 1))
        return torch.stack(rows) if all_logits else rows[-1]

    def _clear_kept(self) -> None:
        if self._kept_slots:
            self._branch_epoch += 1  # forks of the cleared sequences are stale
        for slot in self._kept_slots:
            self._llama_cpp.llama_memory_seq_rm(self._mem, slot, -1, -1)
        self._kept_slots = []

    def _run_branches(
        self,
        cache: LlamaCppCache,
        keep: int,
        branches: Sequence[Sequence[int]],
        rows: Callable[[int], range],
        fork: bool = False,
    ) -> tuple[list[list[torch.Tensor]], dict[int, int]]:
        """Run branches on copies of cache[:keep] (spare sequences sharing its cells), as few
        `llama_decode` calls as the batch size allows; returns for branch j the log-prob rows
        at positions rows(len(branch j)), and, with `fork`, the sequence still holding each branch
        of the last call (only when all branches fit one call)."""
        lc = self._llama_cpp
        self._clear_kept()
        self._branch_epoch += 1
        results: list[list[torch.Tensor]] = [[] for _ in branches]
        group: list[int] = []
        groups = 0
        kept: dict[int, int] = {}

        def flush(last: bool) -> None:
            nonlocal groups
            groups += 1
            tokens, pos, seqs, flags, where = [], [], [], [], []
            for slot, j in enumerate(group, start=MAX_SESSIONS):
                lc.llama_memory_seq_rm(self._mem, slot, -1, -1)
                lc.llama_memory_seq_cp(self._mem, cache.seq, slot, 0, keep)
                b = list(branches[j])
                wanted = set(rows(len(b)))
                where.append(len(tokens))
                for i, t in enumerate(b):
                    tokens.append(t)
                    pos.append(keep + i)
                    seqs.append([slot])
                    flags.append(i in wanted)
            self._decode(tokens, pos, seqs, flags)
            for (slot, j), start in zip(enumerate(group, start=MAX_SESSIONS), where):
                results[j] = [self._logits(start + i) for i in rows(len(branches[j]))]
                if fork and last and groups == 1:
                    kept[j] = slot
                    self._kept_slots.append(slot)
                else:
                    lc.llama_memory_seq_rm(self._mem, slot, -1, -1)
            group.clear()

        budget = 0
        for j, b in enumerate(branches):
            if not rows(len(b)):
                continue
            if len(b) > 512:
                raise FuselmError("a candidate longer than 512 tokens cannot be scored by the llama.cpp backend")
            if len(group) == MAX_BRANCHES or budget + len(b) > 512:
                flush(last=False)
                budget = 0
            group.append(j)
            budget += len(b)
        if group:
            flush(last=True)
        return results, kept

    def score_branches(self, cache: LlamaCppCache, keep: int, branches: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        # A branch's last token is never run: scores only need the rows before each token.
        rows, _ = self._run_branches(cache, keep, [b[:-1] for b in branches], lambda n: range(n))
        return _token_scores(branches, rows)

    def fork_branches(
        self, cache: LlamaCppCache, keep: int, branches: Sequence[Sequence[int]]
    ) -> tuple[list[torch.Tensor], Forks]:
        # One more logits row per branch (its last position) gives the log-probs after it.
        rows, kept = self._run_branches(cache, keep, branches, lambda n: range(n), fork=True)
        lengths = [len(b) for b in branches]
        scores = _token_scores(branches, [rs[:-1] for rs in rows])
        if not kept or len(kept) != len(branches):
            self._clear_kept()
            return scores, Forks(keep, lengths)
        state = (self._branch_epoch, cache.seq, kept)
        return scores, Forks(keep, lengths, [list(b) for b in branches], [rs[-1] for rs in rows], state)

    def adopt(self, cache: LlamaCppCache, forks: Forks, j: int) -> torch.Tensor | None:
        if not forks.available(j):
            return None
        epoch, seq, kept = forks.state
        if epoch != self._branch_epoch or seq != cache.seq or j not in kept:
            return None
        self.truncate(cache, forks.keep)
        n = forks.lengths[j]
        self._llama_cpp.llama_memory_seq_cp(self._mem, kept[j], cache.seq, forks.keep, forks.keep + n)
        cache.ids.extend(forks.branches[j])
        self._clear_kept()
        self._branch_epoch += 1
        return forks.next_logprobs[j]

    def branch_next_logprobs(
        self, cache: LlamaCppCache, keep: int, branches: Sequence[Sequence[int]], batch=None
    ) -> tuple[list[torch.Tensor], object]:
        # A rollout calls this once per step with every branch one token longer: the branches'
        # sequences are kept between calls (`batch` says which holds which), so a step decodes
        # one token per branch. A batch from before another branch run is stale (its epoch).
        parents = [tuple(b[:-1]) for b in branches]
        if (
            batch is not None
            and batch[0] == (self._branch_epoch, cache.seq, keep)
            and all(len(b) > 1 and p in batch[1] for b, p in zip(branches, parents))
            and len(set(parents)) == len(parents)
        ):
            slots = [batch[1][p] for p in parents]
            # Finished branches stay in place until the next clear: removing their cells between
            # two steps made llama.cpp 0.3.36 compute wrong logits for the remaining branches.
            self._decode(
                [b[-1] for b in branches],
                [keep + len(b) - 1 for b in branches],
                [[s] for s in slots],
                [True] * len(slots),
            )
            out = [self._logits(i) for i in range(len(branches))]
        else:
            rows, kept = self._run_branches(cache, keep, branches, lambda n: range(n - 1, n), fork=True)
            out = [rs[0] for rs in rows]
            if len(kept) != len(branches):
                self._clear_kept()
                return out, None
            slots = [kept[j] for j in range(len(branches))]
        return out, ((self._branch_epoch, cache.seq, keep), {tuple(b): s for b, s in zip(branches, slots)})

    def close(self) -> None:
        self._passes.shutdown(wait=True)
        self._ctx.close()
        self._model.close()


def _token_scores(branches: Sequence[Sequence[int]], rows: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Log-prob of each branch token after the first, read from the rows before it."""
    return [
        torch.tensor([float(r[b[i + 1]]) for i, r in enumerate(rs)], dtype=torch.float32)
        for b, rs in zip(branches, rows)
    ]


_LOG_CALLBACK = None


def _quiet_logs(llama_cpp) -> None:
    """Silence llama.cpp's own stderr logging (model loading prints hundreds of lines)."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:

        @llama_cpp.llama_log_callback
        def _cb(level, text, user_data):  # pragma: no cover - C callback
            return None

        _LOG_CALLBACK = _cb
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
