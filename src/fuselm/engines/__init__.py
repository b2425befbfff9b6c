"""Clients of serving engines that hold an expert model in another process.

An engine offers top-k log-probs, not full distributions, and keeps its own KV cache (and
prefix cache): fuselm sends token ids, tokenized by the engine itself so that client and server
never disagree about BOS, special tokens or merges, and keeps no model state of its own. What a
method can run on is stated by each engine's `offers` (see `fusion.base.FusionMethod.needs`).

The package, bottom up:

- `transport.py`: `Transport`, what every request goes through (one HTTP client, retries inside
  a deadline, bounded bodies, errors of one line), and the event loop thread it owns
  (`EventLoopThread`: started at the first call, stopped by `Engine.close`).
- `stream.py`: `EngineStream`, a streamed completion read lazily and bounded; `StreamToken`.
- `answers.py`: the validated shapes every engine's answers are built from.
- `base.py`: `Engine`, what every client has (facts asked once, tokenizing, streams);
  `EngineFacts`, `Sampling`.
- `token_engine.py`: `TokenEngine`, the base of engines on token ids (top-k, rollouts, scores):
  `stream` and `score`, the engine's tokenizer or a checked one here.
- `text_engine.py`: `TextEngine`, the base of engines on text (rollouts only): `text_stream`;
  no `stream`, no `score`.
- one module per engine: `vllm.py`, `sglang.py`, `llamacpp_server.py`.
- here: `ENGINES`, the registry of engine kinds (a model entry's `engine:`, whose choices
  `fuselm.config` derives from it), and `engine_for`.

Every call is a coroutine on the event loop thread of its engine's transport
(`Engine.submit`, `Engine.run`): the calls of one round, of several branches, go out at once
over keep-alive connections, and the synchronous session code waits on their futures.

Faults, and what bounds every call (what a request to fuselm can make an engine client do):

- **Deadlines**: `timeout_s` bounds each call as a whole (`asyncio.timeout` around it): a
  request's connect, every retry with its backoff, the answer's headers and its whole body; a
  stream's opening likewise. A stream is read lazily, over a generation, so it has no deadline
  as a whole: instead each of its tokens must arrive within `timeout_s` of the read that asks
  for it or of the token before (lines without a token, keep-alive comments, do not restart the
  clock), and a stream brings at most its `max_tokens` plus `STREAM_SLACK` tokens, so a stream
  lasts at most (`max_tokens` + `STREAM_SLACK` + 1) x `timeout_s`. An engine that trickles bytes
  fails like one that is silent: `no answer within N s`.
- **Sizes**: bodies are read incrementally and never held beyond their bound: a JSON answer up
  to `MAX_REPLY_BYTES` (8 MiB; more for the requests whose answer grows with the tokens asked,
  `REPLY_BYTES_PER_TOKEN` each), a streamed line up to `MAX_LINE_BYTES` (1 MiB) plus
  `LINE_BYTES_PER_TOKEN` per token the stream may bring (an SGLang chunk repeats everything so
  far; a vLLM chunk holds every token made while the reader was away), an error's text up to
  `ERROR_BODY_BYTES`. Answers are asked for uncompressed; a compressed one is refused.
- **Shapes**: every answer is validated (small pydantic models, `Engine._parse`) before
  use: types, lengths that must agree, finite log-probs that are at most 0 (or -inf), token ids
  from 0 to below the vocabulary size (where the engine's model directory is here: its
  `config.json`) or `MAX_TOKEN_ID`, at most k+1 entries in a top-k.
- **Retries** with backoff for a refused connection, a connection dropped or reset before an
  answer, or a 429/502/503/504 (all calls here are reads, safe to repeat), never for a timeout,
  and all within the call's deadline.
- **Cancellation**: an engine call is a task on its engine's loop; `RemoteModel.run` cancels it
  when the generation's caller cancels (`fuselm.cancel`), which closes its connection.

Every fault is an :class:`EngineError` of one line that names the engine and the endpoint;
nothing an engine answers becomes a KeyError, TypeError, IndexError or ValueError here.

Adding an engine: one module here with a subclass of `TokenEngine` or `TextEngine` (its
`kind`, its requests and its answers' shapes), and its entry in `ENGINES` below
(docs/architecture.md, "Adding an engine").
"""

from __future__ import annotations

from ..errors import FuselmError
from ..registry import Registry
from .base import Engine, EngineFacts, Sampling
from .llamacpp_server import LlamaCppServerEngine
from .sglang import SGLangEngine
from .stream import EngineStream, StreamToken
from .text_engine import TextEngine
from .token_engine import TokenEngine
from .vllm import VLLMEngine

__all__ = [
    "ENGINES",
    "Engine",
    "EngineFacts",
    "EngineStream",
    "LlamaCppServerEngine",
    "SGLangEngine",
    "Sampling",
    "StreamToken",
    "TextEngine",
    "TokenEngine",
    "VLLMEngine",
    "engine_for",
]

# The engine kinds, by `kind`: what a model entry's `engine:` may name (fuselm.config derives its
# choices from this registry) and what `engine_for` builds.
ENGINES: Registry[type[Engine]] = Registry(
    "engine", [VLLMEngine, SGLangEngine, LlamaCppServerEngine], name_of=lambda cls: cls.kind
)


def engine_for(kind: str, url: str, **kwargs) -> Engine:
    if kind not in ENGINES:
        raise FuselmError(f"unknown engine {kind!r}; supported: {', '.join(ENGINES.names())}")
    return ENGINES[kind](url, **kwargs)
