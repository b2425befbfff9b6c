"""What the server runs: models loaded once, setups built once, and requests admitted by slot.

Concurrency (documented in docs/serving.md): a loaded model runs one request at a time. A
request takes all the models of one replica of its setup at once (all or none, so two requests
never hold part of what each other needs) for the time of its generation, in a worker thread.
Requests on different models run side by side; requests on the same model queue for it. A
setup with `replicas: N` has N copies of its models (each with its share of the CPU threads),
and a request runs on whichever copy is free. Each request's sessions own their caches, and a
model's prefix cache hands its warm prompt prefix to whichever request comes next on it, so
few-shot prompts stay cheap.

Admission: at most `max_concurrent` requests hold a slot (a worker thread); at most
`max_queue` more wait for one; beyond that a request is refused at once (429).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import anyio

from ..config import GenerationConfig, ModelConfig
from ..fusion.base import FusionMethod
from ..fusion.loop import decode
from ..fusion.methods import METHODS, build_method, check_method
from ..models.backend import usable_cpus
from ..models.expert import Expert
from ..models.loading import Model, Prompt, load_model
from ..registry import Registry
from ..result import GenerationResult, TextSpan
from .bounds import MethodChoice
from .config import Limits, ServeConfig, Setup


class Overloaded(Exception):
    """Every slot is taken and the queue is full."""


class ModelPool:
    """Each distinct model (name, engine, device, dtype, threads, replica) loaded once, whatever
    setups use it; setups that give it other ensemble weights get their own model object over
    the same backend and prefix cache. Also who is using which model right now."""

    def __init__(self) -> None:
        self._loaded: dict[str, Expert] = {}
        self._busy: set[int] = set()  # ids of backends a generation holds (event-loop state)
        self._changed: asyncio.Event | None = None  # set when models are given back

    @staticmethod
    def _key(cfg: ModelConfig, replica: int) -> str:
        return f"{replica}:" + cfg.model_copy(update={"weight": 1.0}).model_dump_json()

    def get(self, cfg: ModelConfig, replica: int = 0) -> Expert:
        key = self._key(cfg, replica)
        if key not in self._loaded:
            self._loaded[key] = load_model(cfg)
        shared = self._loaded[key]
        if cfg == shared.config:
            return shared
        return shared.with_config(cfg)

    def models(self) -> list[Expert]:
        return list(self._loaded.values())

    @staticmethod
    def _exclusive(models: Sequence[Expert]) -> set[int]:
        """The backends a generation on `models` holds: the in-process ones (an engine serves any
        number of requests at once, and batches them)."""
        return {id(cast(Model, m).backend) for m in models if m.works_in_process}

    def _free(self, choices: Sequence[Sequence[Expert]]) -> int | None:
        for i, models in enumerate(choices):
            if not self._exclusive(models) & self._busy:
                return i
        return None

    @asynccontextmanager
    async def hold(self, choices: Sequence[Sequence[Expert]]):
        """Wait until every model of one of `choices` is free and hold them; yields which. The
        wait is in the event loop, not in a thread: waiting requests cost nothing, and the
        running generation's threads keep the cores (measured: waiting worker threads slowed
        llama.cpp by 5-20% here)."""
        while (i := self._free(choices)) is None:
            changed = self._changed = self._changed or asyncio.Event()
            await changed.wait()
        ids = self._exclusive(choices[i])
        self._busy |= ids
        try:
            yield i
        finally:  # no await here: a cancelled request frees its models at once
            self._busy -= ids
            if self._changed is not None:
                self._changed.set()
                self._changed = None

    def close(self) -> None:
        for m in self._loaded.values():
            m.close()


@dataclass
class Replica:
    """One copy of a setup's models, the setup's method built over them, and the one thread that
    runs their generations. One thread, always the same: llama.cpp's CPU backend (OpenMP) keeps
    a team of spinning threads per calling thread, and a model driven from a pool's threads in
    turn was measured 30% slower here, and stayed slower after."""

    models: list[Expert]
    method: FusionMethod
    worker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="fuselm-gen"))

    @classmethod
    def of(cls, models: list[Expert], method: FusionMethod, concurrent: int) -> Replica:
        """With every model on an engine, `concurrent` generations run at once (the engines batch
        them); with any in-process model, one at a time on the replica's one thread."""
        n = 1 if any(m.works_in_process for m in models) else concurrent
        return cls(models, method, ThreadPoolExecutor(n, thread_name_prefix="fuselm-gen"))

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)
        self.method.close()


@dataclass
class RequestMethod:
    """A method a request asked for (the fuselm extension), built over the first replica when it
    was checked; another replica gets its own copy when the request runs there."""

    choice: MethodChoice
    built: FusionMethod

    def close(self) -> None:
        self.built.close()


@dataclass
class ServedSetup:
    """One model id: its models (loaded, once per replica), its method (built once per replica)
    and its defaults."""

    config: Setup
    replicas: list[Replica]
    pool: ModelPool

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def models(self) -> list[Expert]:
        return self.replicas[0].models

    @property
    def method(self) -> str:
        return self.config.method

    def request_method(self, choice: MethodChoice | None) -> MethodChoice | None:
        """What a request asks for (`serve.bounds`, which validated its options; None: the
        setup's own), checked against this many models without any model work (FuselmError when
        it cannot run on them). Build it with :meth:`build` once admitted."""
        if choice is not None:
            METHODS.get(choice.name).validate_models(len(self.config.models))
        return choice

    def build(self, choice: MethodChoice | None) -> RequestMethod | None:
        """The method of :meth:`request_method` built over the first replica (tokenizer tables,
        a router: model work, done inside the request's slot and deadline)."""
        if choice is None:
            return None
        return RequestMethod(choice, build_method(choice.name, self.models, choice.options))

    def prompt_tokens(self, prompt: Prompt, gen: GenerationConfig) -> int:
        """The longest of the models' tokenizations of the prompt as each renders it."""
        return max(len(m.tokenize(m.prompt_text(prompt, gen))) for m in self.models)

    def context_length(self) -> int:
        return min(m.info.context_length for m in self.models)

    async def run(
        self,
        method: RequestMethod | None,
        prompt: Prompt,
        gen: GenerationConfig,
        on_spans: Callable[[list[TextSpan]], None] | None,
        cancel: threading.Event,
        stop_all: threading.Event,
    ) -> GenerationResult:
        """One generation on a free replica, in a worker thread; it stops at its next step once
        `cancel` or `stop_all` is set (see :func:`run_on`)."""
        async with self.pool.hold([r.models for r in self.replicas]) as i:
            replica = self.replicas[i]

            def work() -> GenerationResult:
                own = None
                if method is None:
                    built = replica.method
                elif i == 0:
                    built = method.built
                else:
                    built = own = build_method(method.choice.name, replica.models, method.choice.options)
                try:
                    check = lambda: cancel.is_set() or stop_all.is_set()  # noqa: E731
                    return decode(built, prompt, gen, cancel=check, on_spans=on_spans)
                finally:
                    if own is not None:
                        own.close()

            return await run_on(replica.worker, work, cancel)

    def close(self) -> None:
        for r in self.replicas:
            r.close()


def replica_configs(setup: Setup) -> list[list[ModelConfig]]:
    """The model configs of each replica: with several replicas, a model that does not say how
    many threads to use gets an equal share of the cores, so that the copies do not fight."""
    if setup.replicas == 1:
        return [list(setup.models)]
    share = max(1, usable_cpus() // setup.replicas)
    models = [
        m if m.threads is not None or not m.in_process else m.model_copy(update={"threads": share})
        for m in setup.models
    ]
    return [models for _ in range(setup.replicas)]


class Scheduler:
    """Slots for generations and a bounded queue in front of them."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self._slots = asyncio.Semaphore(limits.max_concurrent)
        self.waiting = 0
        self.running = 0

    def admit(self) -> None:
        """Refuse now (Overloaded) when a request would find every slot and the queue full."""
        if self._slots.locked() and self.waiting >= self.limits.max_queue:
            raise Overloaded()

    async def acquire(self) -> Slot:
        """Wait for a slot (Overloaded at once when the queue is full); the caller releases it."""
        self.admit()
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        return Slot(self)


class Slot:
    """A held generation slot; released once, by whoever ends the request first (the route, or
    the stream when it ends or never starts)."""

    def __init__(self, scheduler: Scheduler):
        self._scheduler: Scheduler | None = scheduler

    def release(self) -> None:
        s, self._scheduler = self._scheduler, None
        if s is not None:
            s.running -= 1
            s._slots.release()


async def run_on(worker: ThreadPoolExecutor, fn: Callable[[], Any], cancel: threading.Event) -> Any:
    """`fn` on `worker` (a replica's thread). If the awaiting task is cancelled (the client went
    away, the deadline passed), `cancel` is set and this waits until the thread has stopped,
    which the generation does before its next step, so that its slot stays taken till then."""
    future = asyncio.get_running_loop().run_in_executor(worker, fn)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        await wait_quietly(future)
        raise


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
        """Load every model once (per replica) and build every setup's method; then answer one
        token on every replica."""
        for s in self.config.setups:  # cheap checks first: no model loaded for a config error
            check_method(s.method, len(s.models), s.method_options)
        for s in self.config.setups:
            replicas = []
            for r, configs in enumerate(replica_configs(s)):
                models = [self.pool.get(m, replica=r) for m in configs]
                method = build_method(s.method, models, s.method_options)
                replicas.append(Replica.of(models, method, self.config.limits.max_concurrent))
            self.setups.add(ServedSetup(s, replicas, self.pool))
        for setup in self.setups.values():
            gen = setup.config.generation.model_copy(update={"max_new_tokens": 1})
            for replica in setup.replicas:  # on the replica's own thread, as every later request
                replica.worker.submit(decode, replica.method, "Hello", gen, cancel=self.cancel_all.is_set).result()
        self.ready = True

    def close(self) -> None:
        self.cancel_all.set()
        for s in self.setups.values():
            s.close()
        self.pool.close()
