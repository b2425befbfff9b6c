"""fuselm as an lm-evaluation-harness model: any lm-eval task measures a fused setup.

`FuselmLM` is an `lm_eval.api.model.LM` over one fuselm setup (models, method, options), built
from a run config, a calibration, or a model list:

- `generate_until`: the fusion loop (`fusion.loop.decode`), greedy unless the task samples,
  stopped at the task's `until` strings, at most `max_gen_toks` new tokens;
- `loglikelihood`: the fused log-likelihood of each continuation (eval/choice.py: `single`,
  a weighted `product` of experts, or a weighted `mixture`), each member scoring the string with
  its own tokenizer; a row's continuations share one batched call per member;
- `loglikelihood_rolling`: the same rule on a whole text, each member scoring it after its own
  start of text (its BOS, or its end-of-text token where it has no BOS, as lm-eval's HF model).

lm-eval is imported here only: fuselm works without it. `fuselm lm-eval ARGS` (cli/lm_eval.py) registers
the model and runs lm-eval's own command line; `register()` does the same for the Python route
(`lm_eval.simple_evaluate(model="fuselm", model_args=...)`), and `pyproject.toml` declares the
model under the entry-point group `lm_eval.models` for an lm-eval that discovers models that way
(0.4.13, the newest here, does not).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from lm_eval.api.model import LM
from pydantic import ValidationError

from ..config import GenerationConfig, RunConfig, validation_message
from ..errors import FuselmError
from ..fusion.loop import decode
from ..fusion.methods import build_method, check_method
from ..models.loading import load_models
from ..progress import progress_bar
from ..resolve import model_entries, resolve_run_config
from .choice import CHOICE_METHODS, ChoiceScorer
from .memo import Memo, model_key
from .records import check_concurrency

log = logging.getLogger(__name__)
T = TypeVar("T")

MODEL_NAME = "fuselm"
MODELS_SEPARATOR = "+"  # lm-eval splits --model_args on commas: a model list is joined by "+"
# lm-eval's generation_kwargs that fuselm runs; any other is refused by name
GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "seed"}
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default
SCORING_ONLY = set(CHOICE_METHODS) - {"single"}  # product and mixture fuse scores; they generate nothing


def setup_config(
    config: str | None = None,
    calibration: str | None = None,
    models: str | None = None,
    method: str | None = None,
    options: dict[str, Any] | None = None,
) -> RunConfig:
    """The setup that `model_args` describe: a run config file (models, method, method_options,
    generation), a calibration (the setup it chose), or `models` joined by "+" and `method`;
    `options` (any other key=value) are method options, over the file's."""
    # lm-eval gives the text it built (its --apply_chat_template renders one model's template):
    # members read it raw unless the config asks for their own chat templates
    return resolve_run_config(
        config,
        models=model_entries(models, MODELS_SEPARATOR) if models else None,
        method=method or None,
        options=options,
        calibration=calibration,
        generation_defaults={"chat": "raw"},
        method_for_several="adafuse",
        where=config or "model_args",
        no_model="model_args name no model: give config=FILE.yaml, calibration=FILE.yaml or"
        f" models=A{MODELS_SEPARATOR}B",
    )


class FuselmLM(LM):
    """A fused setup as an lm-eval model. `model_args`: `config=FILE.yaml`, `calibration=FILE.yaml`
    or `models=A+B` (with `method=NAME`), and optionally `choice_method=product|mixture` (how
    log-likelihoods are fused when the setup's method decodes; default `product`),
    `concurrency=N` (requests in flight, experts on engines only), `progress=false`; any other
    key is a method option. lm-eval's `batch_size`/`device` are accepted and not used: fuselm
    batches a row's continuations itself."""

    def __init__(
        self,
        config: str | None = None,
        calibration: str | None = None,
        models: str | None = None,
        method: str | None = None,
        choice_method: str = "product",
        concurrency: int = 1,
        progress: bool = True,
        memo: bool = True,
        batch_size: Any = None,
        max_batch_size: Any = None,
        device: Any = None,
        **options: Any,
    ):
        super().__init__()
        setup = setup_config(config, calibration, models, method, options)
        check_concurrency(setup.models, int(concurrency))
        store = Memo() if memo and any(m.in_process for m in setup.models) else None
        keys = [model_key(m) for m in setup.models] if store is not None else None
        self._build(setup, None, choice_method, int(concurrency), bool(progress), store, keys)

    @classmethod
    def over(cls, setup: RunConfig, models: list[Any], choice_method: str = "product", progress: bool = False,
             memo: Memo | None = None, memo_keys: list[str | None] | None = None):  # fmt: skip
        """The setup on models already loaded (a `fuselm eval` run of an lm-eval task), with the
        run's memo: they stay open when this closes."""
        lm = cls.__new__(cls)
        LM.__init__(lm)
        lm._build(setup, models, choice_method, 1, progress, memo, memo_keys, owns_memo=False)
        return lm

    def _build(self, setup: RunConfig, models: list[Any] | None, choice_method: str, concurrency: int, progress: bool,
               memo: Memo | None = None, memo_keys: list[str | None] | None = None, owns_memo: bool = True):  # fmt: skip
        self.setup, self.concurrency, self.progress = setup, concurrency, progress
        # each member's scores read from / kept in the memo of single-model work (eval/memo.py)
        self.memo, self.memo_keys, self.owns_memo = memo, memo_keys, owns_memo and memo is not None
        self.busy_seconds = 0.0  # time spent on requests (lm-eval's own work left out)
        if setup.method in CHOICE_METHODS:
            self.choice_method, choice_options = setup.method, setup.method_options
        else:
            check_method(setup.method, len(setup.models), setup.method_options)
            if choice_method not in CHOICE_METHODS or (choice_method == "single") != (len(setup.models) == 1):
                one = "single" if len(setup.models) == 1 else "product or mixture"
                raise FuselmError(f"choice_method={choice_method!r}: with {len(setup.models)} model(s) use {one}")
            self.choice_method, choice_options = choice_method, None
        self.owns_models = models is None
        self.models = load_models(setup.models) if models is None else models
        self.method = None
        try:
            self.scorer = ChoiceScorer(self.choice_method, self.models, choice_options, memo, memo_keys)
            if setup.method not in SCORING_ONLY:
                self.method = build_method(setup.method, self.models, setup.method_options)
        except BaseException:
            self.close()
            raise

    @property
    def label(self) -> str:
        return f"{self.setup.method}({', '.join(m.name for m in self.setup.models)})"

    # --- lm-eval's three requests -----------------------------------------------------------------
    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        if self.method is None:
            raise FuselmError(
                f"method {self.setup.method!r} scores given continuations and generates nothing; a generation"
                " task needs a decoding method (adafuse, token-average, ...: `fuselm generate --help`)"
            )
        method = self.method
        configs = [self.generation(*r.args) for r in requests]
        return self._each(
            "generate_until", list(zip([r.args[0] for r in requests], configs)),
            lambda item: decode(method, item[0], item[1]).text, disable_tqdm,
        )  # fmt: skip

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # A row's choices share their context: one batched call per member for each context.
        # is_greedy is not defined for a fused score over several tokenizers: always False (an
        # lm-eval `loglikelihood` task's `acc`, as LAMBADA's, needs it; multiple choice does not).
        by_context: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            by_context.setdefault(r.args[0], []).append(i)
        groups = list(by_context.items())
        scored = self._each(
            "loglikelihood", groups,
            lambda g: self._fused(g[0], [requests[i].args[1] for i in g[1]]), disable_tqdm,
        )  # fmt: skip
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for (_, indices), values in zip(groups, scored):
            for i, v in zip(indices, values):
                out[i] = (v, False)
        return out

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        return self._each("loglikelihood_rolling", [r.args[0] for r in requests], self._rolling, disable_tqdm)

    # --- the work ---------------------------------------------------------------------------------
    def generation(self, context: str, gen_kwargs: dict[str, Any] | None = None) -> GenerationConfig:
        """The setup's generation settings with a request's `gen_kwargs` (lm-eval's names)."""
        kwargs = dict(gen_kwargs or {})
        unknown = sorted(set(kwargs) - GEN_KWARGS)
        if unknown:
            raise FuselmError(
                f"generation_kwargs {', '.join(unknown)}: fuselm runs only {', '.join(sorted(GEN_KWARGS))}"
            )
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        update: dict[str, Any] = {
            "stop": list(dict.fromkeys([*self.setup.generation.stop, *until])),
            "max_new_tokens": int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)),
        }
        sample = bool(kwargs.get("do_sample", False))
        update["temperature"] = float(kwargs.get("temperature", 1.0)) if sample else 0.0
        for key in ("top_p", "top_k", "seed"):
            if key in kwargs:
                update[key] = kwargs[key]
        try:
            return GenerationConfig(**{**self.setup.generation.model_dump(), **update})
        except ValidationError as e:
            raise FuselmError(validation_message(e, "generation_kwargs", GenerationConfig)) from None

    def _fused(self, context: str, continuations: list[str]) -> list[float]:
        member, _ = self.scorer.member_scores(context, continuations, self.setup.generation)
        return self.scorer.fused(member)

    def _rolling(self, text: str) -> float:
        member = []
        for m, key in zip(self.models, self.memo_keys or [None] * len(self.models)):
            starts = self._start_of_text(m)
            one = ChoiceScorer("single", [m], None, self.memo, [key])
            scores, _ = one.member_scores(starts, [text], self.setup.generation.model_copy(update={"chat": False}))
            member.append(scores[0])
        return self.scorer.fused(member)[0]

    @staticmethod
    def _start_of_text(model: Any) -> str:
        """What a whole text is scored after: nothing where the model's tokenizer adds its BOS
        (the prompt's tokens are then [BOS]), else its end-of-text token's text, which its
        tokenizer reads back as that token (lm-eval's HF model uses that token as the prefix)."""
        info = model.info
        if info.bos_token_id is not None:
            return ""
        for token in sorted(info.eos_token_ids):
            text = model.decode([token])
            if text and model.tokenize(text) == [token]:
                return text
        raise FuselmError(
            f"{model.name!r} has no BOS and no end-of-text token whose text its tokenizer reads back:"
            " nothing to score a whole text after"
        )

    def _each(self, what: str, items: list[T], fn: Callable[[T], Any], disable_tqdm: bool) -> list[Any]:
        """fn over the items in order, `concurrency` at a time, with a progress bar."""
        out: list[Any] = [None] * len(items)
        t0 = time.perf_counter()
        try:
            return self._each_timed(what, items, fn, disable_tqdm, out)
        finally:
            self.busy_seconds += time.perf_counter() - t0

    def _each_timed(self, what, items, fn, disable_tqdm, out):
        with progress_bar(self.progress and not disable_tqdm) as bar_host:
            bar = bar_host.add_task(f"{MODEL_NAME} {what} {self.label}", total=len(items))
            if self.concurrency == 1:
                for i, item in enumerate(items):
                    out[i] = fn(item)
                    bar_host.update(bar, advance=1)
                return out
            with ThreadPoolExecutor(self.concurrency, thread_name_prefix="fuselm-lm-eval") as pool:
                for i, value in enumerate(pool.map(fn, items)):
                    out[i] = value
                    bar_host.update(bar, advance=1)
        return out

    def close(self) -> None:
        method, self.method = getattr(self, "method", None), None
        if method is not None:
            method.close()
        if getattr(self, "owns_models", False):
            for m in self.models:
                m.close()
            self.models = []
        if getattr(self, "owns_memo", False):
            self.memo.close()
            self.owns_memo = False

    def __del__(self) -> None:  # lm-eval never closes a model; the engines' sessions are let go here
        try:
            self.close()
        except Exception:
            pass


def register() -> None:
    """Register `fuselm` in lm-eval's model registry (after lm-eval's own models, which its
    `get_model` imports only while the registry is empty)."""
    import lm_eval.models  # noqa: F401  (fills the registry first)
    from lm_eval.api.registry import model_registry

    model_registry.register(MODEL_NAME, target=FuselmLM)


def run_cli(args: list[str]) -> int:
    """`lm-eval ARGS` with the `fuselm` model registered (`fuselm lm-eval ARGS`)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    register()
    argv, sys.argv = sys.argv, ["lm-eval", *args]
    try:
        cli_evaluate()
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    finally:
        sys.argv = argv
    return 0


__all__ = ["FuselmLM", "MODEL_NAME", "register", "run_cli", "setup_config"]
