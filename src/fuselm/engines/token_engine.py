"""The base of engines that take and give token ids (vLLM, SGLang): they tokenize for fuselm
(or a tokenizer here that gives the same ids and texts does), stream completions of token-id
prompts with each token's log-prob and top-k, and score given continuations."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from ..conventions import END_OF_TURN_TOKENS, OFFERS_ROLLOUT, OFFERS_SCORE, OFFERS_TOPK
from ..errors import EngineError, FuselmError
from .base import Engine, EngineFacts, Sampling
from .stream import EngineStream, StreamToken

log = logging.getLogger("fuselm")

# Texts on which a tokenizer here must give the engine's ids (with and without special tokens)
# and texts: spaces, newlines, code, digits, accents, CJK, emoji, special tokens written out.
TOKENIZER_PROBES = [
    "",
    "a",
    " The capital of France is Paris.",
    "Hello,  world!\n\n\tdef f(x):\n        return x ** 2  # 12345 67.8",
    "naïve café, Übermaß, 東京タワー, 🙂🚀, ‘quotes’ — dash",
    "<|im_start|>user\nhi<|im_end|><|endoftext|></s><s><eos><end_of_turn>",
    "Question: Who wrote Hamlet?\nAnswer: William Shakespeare\n\nQuestion:",
]


def vocab_size(path: Path) -> int | None:
    """The vocabulary's size in a model directory's `config.json` (or its text model's), if said."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    for part in (config, config.get("text_config") if isinstance(config, dict) else None):
        size = part.get("vocab_size") if isinstance(part, dict) else None
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return size
    return None


class TokenEngine(Engine):
    """An engine on token ids. vLLM and SGLang answer the same `/v1/models`, `/tokenize` (a
    prompt, or chat messages) and `/detokenize`; a subclass says how it streams (`stream`,
    `_stream_chunk`) and scores (`score`), and overrides what it answers differently."""

    offers = frozenset({OFFERS_TOPK, OFFERS_ROLLOUT, OFFERS_SCORE})
    max_top_k: ClassVar[int] = 20
    _detokenized_key: ClassVar[str] = "text"
    _detokenize_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._local: Any = None  # a tokenizer here that gives the engine's ids and texts (checked)

    # --- what a subclass speaks ----------------------------------------------------------------------
    async def stream(self, ids: Sequence[int], max_tokens: int, k: int, sampling: Sampling) -> EngineStream:
        """A completion of the token-id prompt `ids`, streamed token by token with the top-`k`."""
        raise NotImplementedError

    async def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        """For each token-id sequence, log p(token i | tokens before it) for every i >= its start
        (start >= 1), all in as few requests as the engine allows."""
        raise NotImplementedError

    # --- facts -----------------------------------------------------------------------------------------
    async def _ask_facts(self) -> EngineFacts:
        entry = await self._served_model()
        model = self.model_id
        assert model is not None
        with_bos, without, chat = await asyncio.gather(
            self._tokenize("a", True), self._tokenize("a", False), self._chat_probe(), return_exceptions=False
        )
        bos = with_bos[0] if len(with_bos) > len(without) else None
        eos = self._eos_override or await self._eos_ids()
        self._local = await self._local_tokenizer(model)
        if self._local is not None:
            self._vocab = vocab_size(Path(self._tokenizer_spec or model).expanduser())
        return EngineFacts(model, entry.max_model_len or 4096, bos, eos, chat)

    async def _local_tokenizer(self, model: str) -> Any:
        """The tokenizer to use here instead of `/tokenize` and `/detokenize`: the entry's
        `tokenizer:` directory or, by default, the engine's model directory where this machine
        has it (vLLM serving a local path names the model by it), once it gave the engine's own
        ids and texts on every probe text; None to ask the engine (said once, when it differed)."""
        spec = self._tokenizer_spec
        if spec == "engine":
            return None
        path = Path(spec or model).expanduser()
        if not (path / "tokenizer_config.json").is_file():
            if spec:
                raise FuselmError(f"tokenizer: {spec} is not a tokenizer directory (no tokenizer_config.json)")
            return None
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - any failure means: ask the engine
            log.warning("%s: cannot load the tokenizer in %s (%s); asking the engine", self.where, path, e)
            return None
        probes = [(t, special) for t in TOKENIZER_PROBES for special in (True, False)]
        remote = await asyncio.gather(*(self._tokenize(t, special) for t, special in probes))
        texts = await asyncio.gather(*(self._detokenize(ids) for ids in remote))
        for (text, special), ids, back in zip(probes, remote, texts):
            mine = list(tok(text, add_special_tokens=special)["input_ids"])
            if mine != ids or self._local_decode(tok, ids) != back:
                log.warning("%s: the tokenizer in %s differs from the engine's on %r; asking the engine",
                            self.where, path, text)  # fmt: skip
                return None
        log.info("%s: tokenizing here with %s (the same ids and texts as the engine on every probe)", self.where, path)
        return tok

    def _local_decode(self, tok: Any, ids: Sequence[int]) -> str:
        """What this engine's `/detokenize` answers, from a tokenizer here."""
        return tok.decode(list(ids))

    async def _chat_probe(self) -> bool:
        try:
            await self._chat_ids([{"role": "user", "content": "a"}])
        except EngineError:
            return False
        return True

    async def _eos_ids(self) -> frozenset[int]:
        """The end-of-sequence ids: the common end-of-turn tokens that the vocabulary has as
        single special tokens (the same set the in-process backends stop on), plus what the
        engine says where it says it; `eos_token_ids:` in the model entry overrides both."""
        found = await asyncio.gather(*(self._single_token(t) for t in END_OF_TURN_TOKENS))
        return frozenset(i for one in found for i in one) | await self._told_eos_ids()

    async def _told_eos_ids(self) -> frozenset[int]:
        return frozenset()

    async def _single_token(self, text: str) -> list[int]:
        """[id] when `text` is one (special) token of the vocabulary, else []."""
        ids = await self._tokenize(text, False)
        return ids if len(ids) == 1 and await self._detokenize(ids) in ("", text) else []

    # --- tokens --------------------------------------------------------------------------------------
    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        await self.facts()  # the model id, and whether a tokenizer here gives the same ids
        if self._local is not None:
            return list(self._local(text, add_special_tokens=add_special_tokens)["input_ids"])
        return await self._tokenize(text, add_special_tokens)

    async def detokenize(self, ids: Sequence[int]) -> str:
        await self.facts()
        if self._local is not None:
            return self._local_decode(self._local, ids)
        return await self._detokenize(ids)

    @property
    def tokenizes_here(self) -> bool:
        """Whether `tokenize` and `detokenize` run here (known after the first call)."""
        return self._local is not None

    async def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template, ending where the
        assistant's answer starts."""
        await self.facts()
        return await self._chat_ids(messages)

    async def _tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        body = {"model": self.model_id, "prompt": text, "add_special_tokens": add_special_tokens}
        return await self._token_ids("/tokenize", body)

    async def _detokenize(self, ids: Sequence[int]) -> str:
        body = {"model": self.model_id, "tokens": list(ids), **self._detokenize_options}
        return await self._text_of("/detokenize", body, self._detokenized_key)

    async def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        body = {"model": self.model_id, "messages": messages, "add_generation_prompt": True,
                "add_special_tokens": False}  # fmt: skip
        return await self._token_ids("/tokenize", body)

    # --- streamed tokens -------------------------------------------------------------------------------
    async def _push_tokens(
        self, stream: EngineStream, ids: list[int], logprobs: list[float], tops: list[dict[int, float]], text: str
    ) -> None:
        """Add a chunk's tokens to a stream (`text`: the chunk's text, split between them)."""
        stream.room(len(ids))
        if not len(ids) == len(logprobs) == len(tops):
            raise self.transport.bad(
                stream.path, f"{len(ids)} tokens, {len(logprobs)} log-probs and {len(tops)} top-k in a chunk"
            )
        if any(len(top) > stream.k + 1 for top in tops):
            raise self.transport.bad(stream.path, f"a top-k of more than {stream.k + 1} entries ({stream.k} asked)")
        facts = await self.facts()
        texts = await self._token_texts(stream, ids, text)
        for tok, lp, top, piece in zip(ids, logprobs, tops, texts):
            eos = tok in facts.eos_token_ids
            stream.tokens.append(StreamToken(tok, float(lp), top, "" if eos else piece, eos))

    async def _end_stream(self, stream: EngineStream, stopped: bool) -> None:
        """The engine ended the stream: on end of sequence when `stopped`, else at max_tokens."""
        stream.finished = stopped
        if stopped and stream.tokens and not stream.tokens[-1].eos:
            # an end-of-sequence id the probe did not know: learn it
            facts = await self.facts()
            last = stream.tokens[-1]
            facts.eos_token_ids = facts.eos_token_ids | {last.token_id}
            last.eos, last.text = True, ""
        await stream.aclose()

    async def _token_texts(self, stream: EngineStream, ids: list[int], text: str) -> list[str]:
        """Each token's share of a chunk's text: exact for one token per chunk (the usual case);
        a chunk of several (the engine ran ahead of the reader) is split by detokenizing."""
        if len(ids) <= 1:
            return [text] * len(ids)
        # decoded after the token before them (a lone SentencePiece token would lose its space)
        before = [t.token_id for t in stream.tokens[-1:]] or stream.anchor
        anchor = len(await self.detokenize(before)) if before else 0
        out, prev = [], 0
        for i in range(1, len(ids) + 1):
            upto = len(await self.detokenize(before + ids[:i])) - anchor if i < len(ids) else len(text)
            out.append(text[prev:upto])
            prev = upto
        return out
