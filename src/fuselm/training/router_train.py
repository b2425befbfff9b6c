"""`fuselm train-router`: build the router's training data with the experts, then train it.

Phases run in the order of ``schedule``:

* ``sft``: every SFT example updates the whole router (LM + routing head) with
  L_LM + lam * L_expert.
* ``cdpo``: preference pairs only, DPO on the LM parameters against the router as it was when
  the first preference phase began (the SFT router), with the selected expert's chosen-vs-rejected
  log-likelihood ratio as a stop-gradient bias.
* ``mix``: SFT examples and preference pairs shuffled into the same batches; SFT examples update
  everything, pairs only the LM parameters (their loss never reaches the routing head).

Everything that takes long is resumable: annotation files are appended example by example, and
a checkpoint (router weights, optimizer state, position in the schedule) is written every
``checkpoint_every`` optimizer steps; running the same command again continues from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config import ModelConfig, StrictModel, validation_message
from ..errors import FuselmError
from ..eval.tasks import get_task
from ..files import DirLock, atomic_write, load_yaml
from ..models.backend import require_same_vocabulary, vocab_fingerprint
from ..progress import progress_bar
from ..router.losses import cdpo_loss, informative_mask, routing_accuracy, sequence_logprob, sft_loss
from ..router.model import RouterMeta, RouterModel, RouterOutput, add_lora, load_router, save_router
from .router_data import (
    AnnotatedAnswer,
    JsonlStore,
    LeftOut,
    PreferencePair,
    PreferenceRecord,
    SFTExample,
    SFTRecord,
    build_preferences,
    build_sft,
    check_stored_sft,
    load_task_rows,
    pref_items,
    sft_items,
)


class TrainerState(BaseModel):
    """Where training is, as a checkpoint's trainer.json keeps it (with the config's fingerprint
    and the optimizer's layout beside the safetensors): read back validated."""

    model_config = ConfigDict(extra="forbid")

    phase: int = 0  # the schedule's phase being run
    step: int = 0  # steps done in that phase
    global_step: int = 0
    references: dict[str, dict[str, float]] = Field(default_factory=dict)  # per pair: the CDPO references
    history: list[dict[str, float]] = Field(default_factory=list)  # each step's losses
    fingerprint: str = ""
    optimizer_layout: dict[str, Any] = Field(default_factory=dict)


class TrainTask(StrictModel):
    task: str = Field(..., description="task name (its prompt format and answer)")
    data: str | None = Field(None, description="JSONL file (default: the task's training file in the data directory)")
    limit: int | None = Field(None, ge=1, description="first rows only")
    shots: int | None = Field(None, ge=0, description="keep only the last N few-shot examples of the prompt")


class PreferenceData(TrainTask):
    samples: int = Field(4, ge=1, description="sampled answers per expert and prompt")
    temperature: float = Field(0.8, gt=0)


class LoraSettings(StrictModel):
    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)


class Phase(StrictModel):
    kind: Literal["sft", "cdpo", "mix"]
    epochs: float = Field(1.0, gt=0)


class RouterTrainConfig(StrictModel):
    backbone: str = Field("qwen2.5-coder-0.5b", description="router backbone (model reference, transformers)")
    experts: list[str] = Field(["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"], min_length=2)
    expert_backend: Literal["auto", "llamacpp", "transformers"] = "auto"
    sft: list[TrainTask] = Field(default_factory=lambda: [TrainTask(task="nq", limit=200, shots=1)])
    preference: list[PreferenceData] = Field(default_factory=list)
    schedule: list[Phase] = Field(default_factory=lambda: [Phase(kind="sft")])
    lora: LoraSettings | None = Field(default_factory=LoraSettings)
    lam: float = Field(1 / 3, ge=0, description="weight of the expert-mixture loss")
    beta: float = Field(0.1, gt=0, description="CDPO temperature")
    lr: float = Field(2e-4, gt=0, description="learning rate of the LM parameters")
    head_lr: float = Field(1e-3, gt=0, description="learning rate of the routing head")
    batch_size: int = Field(4, ge=1, description="examples per optimizer step (accumulated)")
    max_length: int = Field(512, ge=8, description="longest prompt + answer, in tokens")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="SFT examples held out for the final evaluation")
    checkpoint_every: int = Field(20, ge=1, description="optimizer steps between checkpoints")
    seed: int = 0
    data_dir: str | None = None
    out: str = "runs/router"

    @model_validator(mode="after")
    def _check(self) -> RouterTrainConfig:
        if len(set(self.experts)) != len(self.experts):
            raise ValueError("experts must be different models")
        kinds = {p.kind for p in self.schedule}
        if kinds & {"cdpo", "mix"} and not self.preference:
            raise ValueError("a cdpo or mix phase needs `preference` data")
        if "sft" not in kinds and "mix" not in kinds:
            raise ValueError("the schedule needs an sft or mix phase to train the routing head")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> RouterTrainConfig:
        p = Path(path)
        data = load_yaml(p)
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**data)
        except ValidationError as e:
            raise FuselmError(validation_message(e, str(p), cls)) from None

    def fingerprint(self) -> str:
        """What a checkpoint must match to be resumed (paths and the checkpoint cadence excluded)."""
        d = self.model_dump(exclude={"out", "checkpoint_every", "data_dir"})
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --- tensors for one example ---------------------------------------------------------------------
def answer_window(router: RouterModel, ids: torch.Tensor, start: int) -> RouterOutput:
    """The router over all of `ids` [1, T], with LM and routing logits for positions `start`..T-1
    only: `start` is the position that predicts the first answer token, and no earlier position
    is ever trained on. Over a prompt of a few hundred tokens the LM head and its log-softmax at
    every position ([T, 151k] for Qwen) would be a large part of the step for nothing."""
    out = router(input_ids=ids, logits_to_keep=ids.shape[1] - start)
    return RouterOutput(out.lm_logits, out.route_logits[:, start:])


def sft_tensors(item: SFTExample) -> dict[str, torch.Tensor]:
    """One SFT example: `ids` [1, T] for the model and `start` for :func:`answer_window`; every
    other tensor covers that window only (index 0 is position `start`, predicting the first answer
    token), in the convention of :mod:`.losses`."""
    p, t = item.prompt_ids, item.target_ids
    ids = torch.tensor([p + t])
    start, width, E = len(p) - 1, len(t) + 1, len(item.expert_greedy)
    target_mask = torch.zeros(1, width, dtype=torch.bool)
    target_mask[0, 1:] = True
    expert_lp = torch.zeros(1, width, E)
    expert_lp[0, : len(t)] = torch.tensor(item.expert_logprobs)
    greedy = torch.zeros(E, 1, width, dtype=torch.long)  # the last position predicts nothing: all agree
    greedy[:, 0, : len(t)] = torch.tensor(item.expert_greedy)
    best = torch.zeros(1, width, dtype=torch.long)
    best[0, : len(t)] = torch.tensor(item.expert_logprobs).argmax(-1)
    return {
        "ids": ids,
        "start": start,
        "window_ids": ids[:, start:],
        "target_mask": target_mask,
        "expert_lp": expert_lp,
        "informative": informative_mask(greedy),
        "best": best,
    }


def _answer_logprob(router: RouterModel, ann: AnnotatedAnswer) -> tuple[torch.Tensor, torch.Tensor]:
    """(router LM log-likelihood of the answer, routing argmax at each answer position)."""
    p, t = ann.prompt_ids, ann.target_ids
    ids = torch.tensor([p + t])
    out = answer_window(router, ids, len(p) - 1)
    mask = torch.ones(1, len(t) + 1, dtype=torch.bool)
    mask[0, 0] = False  # the window's first token is the prompt's last
    routes = out.route_logits[0, : len(t)].argmax(-1)
    return sequence_logprob(out.lm_logits, ids[:, len(p) - 1 :], mask)[0], routes


def _selected_expert_logprob(ann: AnnotatedAnswer, routes: torch.Tensor) -> float:
    return float(sum(ann.expert_logprobs[i][int(e)] for i, e in enumerate(routes)))


# --- trainer -------------------------------------------------------------------------------------
class RouterTrainer:
    def __init__(self, cfg: RouterTrainConfig, show_progress: bool = True):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.show_progress = show_progress
        self.data_dir = Path(cfg.data_dir) if cfg.data_dir else None

    # data ------------------------------------------------------------------------------------
    def build_data(self, tokenizer) -> tuple[JsonlStore, JsonlStore]:
        from ..models.loading import load_in_process

        cfg = self.cfg
        sft: JsonlStore = JsonlStore(self.out / "data" / "sft.jsonl", SFTRecord)
        pref: JsonlStore = JsonlStore(self.out / "data" / "preference.jsonl", PreferenceRecord)
        jobs = []
        for spec in cfg.sft:
            rows = load_task_rows(spec.task, spec.data, self.data_dir, spec.limit)
            jobs.append(("sft", spec, rows))
        for spec in cfg.preference:
            rows = load_task_rows(spec.task, spec.data, self.data_dir, spec.limit)
            jobs.append(("pref", spec, rows))

        def tokenize(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        for kind, spec, rows in jobs:
            if kind == "sft":
                prefix = get_task(spec.task).prompt_prefix(self.data_dir, spec.shots)
                check_stored_sft(spec.task, rows, tokenize, prefix, sft, cfg.max_length)
        have = {"sft": {it.source for it in sft.items}, "pref": {it.source for it in pref.items}}
        todo = sum(1 for kind, spec, rows in jobs for r in rows if f"{spec.task}:{r['id']}" not in have[kind])
        if todo == 0:
            return sft, pref
        experts = [load_in_process(ModelConfig(name=n, backend=cfg.expert_backend)) for n in cfg.experts]

        require_same_vocabulary("router training", [self.backbone, *(m.backend for m in experts)])
        with progress_bar(self.show_progress) as progress:
            for kind, spec, rows in jobs:
                prefix = get_task(spec.task).prompt_prefix(self.data_dir, spec.shots)
                bar = progress.add_task(f"annotate {kind} {spec.task}", total=len(rows))

                def tick(bar=bar):
                    progress.update(bar, advance=1)

                if kind == "sft":
                    build_sft(
                        spec.task, rows, tokenize, [m.backend for m in experts], prefix, sft, cfg.max_length, tick
                    )
                else:
                    build_preferences(
                        spec.task, rows, tokenize, experts, prefix, pref, spec.samples, spec.temperature, cfg.seed, tick
                    )
        for m in experts:
            m.backend.close()
        return sft, pref

    # model -----------------------------------------------------------------------------------
    def _base(self):
        from ..models.loading import load_in_process

        base = load_in_process(ModelConfig(name=self.cfg.backbone, backend="transformers")).backend
        self.backbone = base  # the vocabulary the router is trained on (checked against the experts')
        return base.model, base.tokenizer

    def new_router(self) -> tuple[RouterModel, Any]:
        backbone, tokenizer = self._base()
        torch.manual_seed(self.cfg.seed)
        router = RouterModel(backbone, len(self.cfg.experts))
        if self.cfg.lora is not None:
            router = add_lora(router, r=self.cfg.lora.r, alpha=self.cfg.lora.alpha, dropout=self.cfg.lora.dropout)
        return router, tokenizer

    def meta(self, router: RouterModel, tokenizer, extra: dict | None = None) -> RouterMeta:
        return RouterMeta(
            backbone=self.cfg.backbone,
            experts=[expert_name(e) for e in self.cfg.experts],
            vocab_size=router.vocab_size,
            vocab_fingerprint=vocab_fingerprint(self.backbone),
            extra=extra or {},
        )

    # training --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train (or resume) with the output directory locked against a second trainer."""
        with DirLock(self.out, "train-router"):
            return self._run()

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        atomic_write(self.out / "config.yaml", yaml.safe_dump(cfg.model_dump(), sort_keys=False))
        ckpt = self._recover_checkpoint()
        saved = None
        if (ckpt / "trainer.json").is_file():
            try:
                saved = TrainerState.model_validate_json((ckpt / "trainer.json").read_text())
            except ValidationError:
                raise FuselmError(
                    f"{ckpt}/trainer.json is not a checkpoint of this version; delete the checkpoint"
                ) from None
        if saved is not None and saved.fingerprint != cfg.fingerprint():
            raise FuselmError(f"{ckpt} was made with a different config; use another --out or delete the checkpoint")
        if saved is not None:
            print(f"resuming from {ckpt} at step {saved.global_step}", file=sys.stderr, flush=True)
            backbone, tokenizer = self._base()
            router, _ = load_router(ckpt, backbone)
        else:
            router, tokenizer = self.new_router()
        sft_store, pref_store = self.build_data(tokenizer)
        sft_all = list(sft_items(sft_store))
        if not sft_all and any(p.kind in ("sft", "mix") for p in cfg.schedule):
            raise FuselmError("no SFT examples were built (check the sft data)")
        val = [it for it in sft_all if _held_out(it.source, cfg.val_fraction)]
        train_sft = [it for it in sft_all if not _held_out(it.source, cfg.val_fraction)] or sft_all
        pairs = list(pref_items(pref_store))
        if any(p.kind in ("cdpo", "mix") for p in cfg.schedule) and not pairs:
            raise FuselmError(
                "no preference pairs: no prompt had both a correct and an incorrect sampled answer "
                "(more samples, more rows, or a higher temperature)"
            )

        plan = []  # (phase index, kind, list of items per step)
        for i, phase in enumerate(cfg.schedule):
            pool = {"sft": train_sft, "cdpo": pairs, "mix": train_sft + pairs}[phase.kind]
            rng = random.Random(cfg.seed * 1000 + i)
            n = max(1, round(len(pool) * phase.epochs))
            order = []
            while len(order) < n:
                chunk = list(pool)
                rng.shuffle(chunk)
                order.extend(chunk)
            order = order[:n]
            steps = [order[k : k + cfg.batch_size] for k in range(0, n, cfg.batch_size)]
            plan.append((i, phase.kind, steps))
        total_steps = sum(len(s) for _, _, s in plan)

        optimizer = self._optimizer(router)
        state = TrainerState(fingerprint=cfg.fingerprint())
        if saved is not None:
            from safetensors.torch import load_file

            state = saved
            flat = load_file(str(ckpt / "optimizer.safetensors"))
            optimizer.load_state_dict(_unflatten_optimizer(flat, saved.optimizer_layout, optimizer))
        router.train()
        t0 = time.perf_counter()
        tokens_seen = 0
        with progress_bar(self.show_progress) as progress:
            bar = progress.add_task("train", total=total_steps, completed=state.global_step)
            for i, kind, steps in plan:
                if i < state.phase:
                    continue
                # The reference for every preference phase is the router as the first one begins
                # (after SFT), computed once and kept in the checkpoint.
                if kind in ("cdpo", "mix") and not state.references:
                    state.references = self._references(router, pairs)
                refs = state.references
                start = state.step if i == state.phase else 0
                for k in range(start, len(steps)):
                    optimizer.zero_grad(set_to_none=True)
                    logs: dict[str, float] = {}
                    for item in steps[k]:
                        loss, parts, ntok = self._loss(router, item, refs)
                        (loss / len(steps[k])).backward()
                        tokens_seen += ntok
                        for key, v in parts.items():
                            logs[key] = logs.get(key, 0.0) + v / len(steps[k])
                    optimizer.step()
                    state.phase, state.step, state.global_step = i, k + 1, state.global_step + 1
                    logs["phase"] = i
                    state.history.append({key: round(v, 5) for key, v in logs.items()})
                    rate = tokens_seen / max(time.perf_counter() - t0, 1e-9)
                    desc = f"{kind} loss {logs.get('loss', 0):.3f} {rate:.0f} tok/s"
                    progress.update(bar, advance=1, description=desc)
                    if state.global_step % cfg.checkpoint_every == 0:
                        self._checkpoint(router, optimizer, tokenizer, state)
                state.phase, state.step = i + 1, 0
        self._checkpoint(router, optimizer, tokenizer, state)
        summary = self.evaluate(router, val or train_sft[: max(1, len(train_sft) // 10)])
        summary.update(
            steps=state.global_step,
            sft_examples=len(train_sft),
            sft_left_out_for_length=sum(1 for it in sft_store.items if isinstance(it, LeftOut)),
            held_out=len(val),
            preference_pairs=len(pairs),
            seconds=round(time.perf_counter() - t0, 1),
        )
        final = self.out / "router"
        save_router(router, final, self.meta(router, tokenizer, {"training": summary, "config": cfg.model_dump()}))
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        return summary

    def _loss(
        self, router: RouterModel, item: SFTExample | PreferencePair, refs: dict
    ) -> tuple[torch.Tensor, dict[str, float], int]:
        if isinstance(item, SFTExample):
            x = sft_tensors(item)
            out = answer_window(router, x["ids"], x["start"])
            loss, parts = sft_loss(
                out, x["window_ids"], x["target_mask"], x["expert_lp"], x["informative"], self.cfg.lam
            )
            return (
                loss,
                {"loss": float(loss.detach()), **{k: v for k, v in parts.items() if k != "informative"}},
                int(x["ids"].shape[1]),
            )
        ref = refs[item.source]
        chosen, _ = _answer_logprob(router, item.chosen)
        rejected, _ = _answer_logprob(router, item.rejected)
        loss = cdpo_loss(
            chosen[None],
            rejected[None],
            torch.tensor([ref["ref_chosen"]]),
            torch.tensor([ref["ref_rejected"]]),
            torch.tensor([ref["expert_chosen"]]),
            torch.tensor([ref["expert_rejected"]]),
            beta=self.cfg.beta,
        )
        ntok = sum(len(a.prompt_ids) + len(a.target_ids) for a in (item.chosen, item.rejected))
        return loss, {"loss": float(loss.detach()), "cdpo": float(loss.detach())}, ntok

    @torch.no_grad()
    def _references(self, router: RouterModel, pairs: list[PreferencePair]) -> dict[str, dict[str, float]]:
        """The reference router's log-likelihoods (the router as the phase begins) and the log-likelihood
        under the experts it selects, for every pair; computed once and kept in the checkpoint."""
        router.eval()
        refs = {}
        for item in pairs:
            c, rc = _answer_logprob(router, item.chosen)
            r, rr = _answer_logprob(router, item.rejected)
            refs[item.source] = {
                "ref_chosen": float(c),
                "ref_rejected": float(r),
                "expert_chosen": _selected_expert_logprob(item.chosen, rc),
                "expert_rejected": _selected_expert_logprob(item.rejected, rr),
            }
        router.train()
        return refs

    @torch.no_grad()
    def evaluate(self, router: RouterModel, items: list[dict]) -> dict[str, Any]:
        """Held-out SFT examples: routing accuracy at informative positions (against the expert that
        gives the gold token the highest probability), the router LM's loss, and the gold token's
        log-likelihood under the routed expert and under each expert alone."""
        router.eval()
        hits = total = 0
        best_counts = [0] * len(self.cfg.experts)  # how often each expert is the best one
        nll = {"router_lm": 0.0, "routed_expert": 0.0}
        nll.update({f"expert:{n}": 0.0 for n in self.cfg.experts})
        count = 0
        for item in items:
            x = sft_tensors(item)
            out = answer_window(router, x["ids"], x["start"])
            acc = routing_accuracy(out.route_logits, x["best"], x["informative"])
            n_inf = int(x["informative"].sum())
            for e in range(len(self.cfg.experts)):
                best_counts[e] += int((x["best"][x["informative"]] == e).sum())
            if n_inf:
                hits += acc * n_inf
                total += n_inf
            t = len(item.target_ids)
            lm = torch.log_softmax(out.lm_logits[0, :t].float(), -1)
            gold = torch.tensor(item.target_ids)
            routes = out.route_logits[0, :t].argmax(-1)
            elp = torch.tensor(item.expert_logprobs)  # [t, E]
            nll["router_lm"] -= float(lm.gather(1, gold[:, None]).sum())
            nll["routed_expert"] -= float(elp.gather(1, routes[:, None]).sum())
            for e, name in enumerate(self.cfg.experts):
                nll[f"expert:{name}"] -= float(elp[:, e].sum())
            count += t
        router.train()
        return {
            "routing_accuracy_informative": round(hits / total, 4) if total else None,
            # what always picking the most often best expert would score: the bar to clear
            "majority_expert_accuracy": round(max(best_counts) / total, 4) if total else None,
            "informative_positions": total,
            "nll_per_token": {k: round(v / max(count, 1), 4) for k, v in nll.items()},
            "answer_tokens": count,
        }

    # checkpoints -----------------------------------------------------------------------------
    def _checkpoint(self, router, optimizer, tokenizer, state) -> None:
        from safetensors.torch import save_file

        tmp = self.out / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_router(router, tmp, self.meta(router, tokenizer))
        flat, layout = _flatten_optimizer(optimizer)
        save_file(flat, str(tmp / "optimizer.safetensors"))
        info = state.model_copy(update={"fingerprint": self.cfg.fingerprint(), "optimizer_layout": layout})
        (tmp / "trainer.json").write_text(info.model_dump_json() + "\n", encoding="utf-8")
        final = self.out / "checkpoint"
        old = self.out / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def _recover_checkpoint(self) -> Path:
        """The checkpoint directory; after a crash between the two renames of :meth:`_checkpoint`
        only `checkpoint.tmp` (complete once it has trainer.json, written last) or
        `checkpoint.old` is there: the newer complete one becomes the checkpoint again."""
        final = self.out / "checkpoint"
        if not final.exists():
            for leftover in (self.out / "checkpoint.tmp", self.out / "checkpoint.old"):
                if (leftover / "trainer.json").is_file():
                    os.replace(leftover, final)
                    break
        return final

    def _optimizer(self, router: RouterModel) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            [
                {"params": router.lm_parameters(), "lr": self.cfg.lr},
                {"params": router.head_parameters(), "lr": self.cfg.head_lr},
            ],
            weight_decay=0.0,
        )


def expert_name(ref: str) -> str:
    """The name a model reference loads under (what `--models` gives at generation time)."""
    from ..models.catalog import BUNDLED

    if ref in BUNDLED:
        return ref
    p = Path(ref).expanduser()
    return p.stem if p.suffix == ".gguf" else p.name


def _held_out(source: str, fraction: float) -> bool:
    return fraction > 0 and (zlib.crc32(source.encode()) % 10_000) < fraction * 10_000


def _flatten_optimizer(optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as flat tensors (safetensors) plus a JSON layout for the rest."""
    sd = optimizer.state_dict()
    flat: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, v in st.items():
            if torch.is_tensor(v):
                flat[f"{pid}.{key}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = v
    return flat, {"scalars": scalars, "param_groups": sd["param_groups"]}


def _unflatten_optimizer(flat: dict[str, torch.Tensor], layout: dict[str, Any], optimizer) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in flat.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = t
    for pid, vals in layout.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(vals)
    groups = layout.get("param_groups") or optimizer.state_dict()["param_groups"]
    return {"state": state, "param_groups": groups}
