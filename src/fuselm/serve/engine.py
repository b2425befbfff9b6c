"""What the server runs: models loaded once, setups built once, and requests admitted by slot.

Concurrency (documented in docs/serving.md): a loaded model runs one request at a time. Each
backend has a lock; a request takes the locks of all its setup's models (in one global order,
so two requests never wait on each other in a cycle) for the time of its generation, in a
worker thread. Requests on different models run side by side; requests on the same model
queue for it. Each request's sessions own their caches, and a model's prefix cache hands its
warm prompt prefix to whichever request comes next, so few-shot prompts stay cheap.

Admission: at most `max_concurrent` requests hold a slot (a worker thread); at most
`max_queue` more wait for one; beyond that a request is refused at once (429).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

from ..config import GenerationConfig, ModelConfig
from ..fusion.base import FusionMethod
from ..fusion.loop import GenerationCancelled, decode
from ..fusion.methods import build_method, check_method
from ..models.loading import Model, Prompt, load_model
from ..registry import Registry
from ..result import GenerationResult
from .config import Limits, ServeConfig, Setup


class Overloaded(Exception):
    """Every slot is taken and the queue is full."""


@dataclass
class LoadedModel:
    model: Model
    lock: threading.Lock = field(default_factory=threading.Lock)
    order: int = 0  # the global lock order


class ModelPool:
    """Each distinct model (name, engine, device, dtype...) loaded once, whatever setups use it;
    setups that give it other ensemble weights get their own Model object over the same backend
    and prefix cache."""

    def __init__(self) -> None:
        self._loaded: dict[str, LoadedModel] = {}

    @staticmethod
    def _key(cfg: ModelConfig) -> str:
        return cfg.model_copy(update={"weight": 1.0}).model_dump_json()

    def get(self, cfg: ModelConfig) -> tuple[Model, LoadedModel]:
        key = self._key(cfg)
        if key not in self._loaded:
            self._loaded[key] = LoadedModel(load_model(cfg), order=len(self._loaded))
        shared = self._loaded[key]
        if cfg == shared.model.config:
            return shared.model, shared
        return Model(shared.model.backend, cfg, shared.model.prefix_cache), shared

    def models(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    def close(self) -> None:
        for lm in self._loaded.values():
            lm.model.close()


@dataclass
class ServedSetup:
    """One model id: its models (loaded), its method (built once) and its defaults."""

    config: Setup
    models: list[Model]
    method: FusionMethod
    loaded: list[LoadedModel]

    @property
    def id(self) -> str:
        return self.config.id

    def build(self, method: str | None, options: dict[str, Any] | None) -> FusionMethod:
        """The setup's own method, or one built for a request that names another method or options."""
        if method is None and options is None:
            return self.method
        name = method or self.config.method
        opts = options if options is not None else (self.config.method_options if method is None else {})
        check_method(name, len(self.models), opts)
        return build_method(name, self.models, opts)

    def prompt_tokens(self, prompt: Prompt, gen: GenerationConfig) -> int:
        """The longest of the models' tokenizations of the prompt as each renders it."""
        return max(len(m.backend.tokenize(m.prompt_text(prompt, gen))) for m in self.models)

    def context_length(self) -> int:
        return min(m.info.context_length for m in self.models)

    def generate(
        self,
        method: FusionMethod,
        prompt: Prompt,
        gen: GenerationConfig,
        on_text: Callable[[str], None] | None,
        cancel: Callable[[], bool],
    ) -> GenerationResult:
        """Run one generation with the setup's models locked (blocking: call from a worker)."""
        locks = sorted({id(lm): lm for lm in self.loaded}.values(), key=lambda lm: lm.order)
        taken: list[threading.Lock] = []
        try:
            for lm in locks:
                while not lm.lock.acquire(timeout=0.05):
                    if cancel():
                        raise GenerationCancelled("cancelled while waiting for its models")
                taken.append(lm.lock)
            return decode(method, prompt, gen, on_text=on_text, cancel=cancel)
        finally:
            for lock in reversed(taken):
                lock.release()


class Scheduler:
    """Slots for generations, a bounded queue in front of them, and the threads they run in."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self._slots = asyncio.Semaphore(limits.max_concurrent)
        self.waiting = 0
        self.running = 0
        self.executor = ThreadPoolExecutor(max_workers=limits.max_concurrent, thread_name_prefix="fuselm-gen")

    def admit(self) -> None:
        """Refuse now (Overloaded) when a request would find every slot and the queue full."""
        if self._slots.locked() and self.waiting >= self.limits.max_queue:
            raise Overloaded()

    @asynccontextmanager
    async def slot(self):
        self.admit()
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()

    async def run(self, fn: Callable[[], Any], cancel: threading.Event) -> Any:
        """`fn` in a worker thread. If the awaiting task is cancelled (the client went away, the
        deadline passed), `cancel` is set and the slot is kept until the thread has stopped,
        which the generation does before its next step."""
        future = asyncio.get_running_loop().run_in_executor(self.executor, fn)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.set()
            await wait_quietly(future)
            raise

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


async def wait_quietly(future) -> None:
    """Wait for a cancelled generation's thread to stop (shielded: the caller is being cancelled,
    and anyio cancels every await of a cancelled scope) and drop its outcome."""
    with anyio.CancelScope(shield=True):
        await asyncio.gather(future, return_exceptions=True)


class Engine:
    """Everything a server holds across requests: the setups, the models, the scheduler."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.pool = ModelPool()
        self.setups: Registry[ServedSetup] = Registry("model", name_of=lambda s: s.id)
        self.scheduler = Scheduler(config.limits)
        self.ready = False
        self.load_error: str | None = None
        self.started = int(time.time())
        self.cancel_all = threading.Event()  # set at shutdown: every generation stops at its next step

    def load(self) -> None:
        """Load every model once and build every setup's method; then answer one token per setup."""
        for s in self.config.setups:  # cheap checks first: no model loaded for a config error
            check_method(s.method, len(s.models), s.method_options)
        for s in self.config.setups:
            pairs = [self.pool.get(m) for m in s.models]
            models = [m for m, _ in pairs]
            self.setups.add(
                ServedSetup(s, models, build_method(s.method, models, s.method_options), [lm for _, lm in pairs])
            )
        for setup in self.setups.values():
            gen = setup.config.generation.model_copy(update={"max_new_tokens": 1})
            setup.generate(setup.method, "Hello", gen, None, self.cancel_all.is_set)
        self.ready = True

    def close(self) -> None:
        self.cancel_all.set()
        self.scheduler.close()
        for s in self.setups.values():
            s.method.close()
        self.pool.close()
