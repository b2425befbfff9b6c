"""transformers backend: any causal LM directory (safetensors) on CPU or CUDA."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..conventions import END_OF_TURN_TOKENS
from ..errors import FuselmError
from .backend import Backend, Forks, ModelInfo, log_softmax_f32

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TransformersBackend(Backend):
    """A Hugging Face causal LM with a DynamicCache.

    Every layer, sliding-window ones included, keeps its full key/value history: this is what
    lets a session roll back to any earlier position (Gemma-3's sliding layers otherwise drop
    keys once the window is full). The attention mask still applies the window.
    """

    def __init__(self, model, tokenizer, name: str, source: str = "", device: str = "cpu"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        config = model.config.get_text_config(decoder=True)
        self._add_bos = _tokenizer_adds_bos(tokenizer)
        self._held: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> its token ids
        self.info = ModelInfo(
            name=name,
            backend="transformers",
            architecture=str(getattr(config, "model_type", "?")),
            vocab_size=int(model.get_output_embeddings().weight.shape[0]),
            context_length=int(getattr(config, "max_position_embeddings", 4096) or 4096),
            eos_token_ids=frozenset(_eos_ids(model, tokenizer)),
            bos_token_id=tokenizer.bos_token_id if self._add_bos else None,
            has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
            source=source,
        )

    @classmethod
    def from_directory(
        cls,
        path: str | Path,
        name: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        trust_remote_code: bool = False,
    ) -> "TransformersBackend":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FuselmError(f"{path} is not a transformers model directory (no config.json)")
        if dtype not in DTYPES:
            raise FuselmError(f"invalid dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
            ).to(device)
        except (OSError, ValueError) as e:
            raise FuselmError(f"cannot load {path}: {str(e).splitlines()[0]}") from e
        return cls(model, tokenizer, name=name or path.name, source=str(path), device=device)

    # --- text ---------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self._add_bos:
            ids = [self.tokenizer.bos_token_id, *ids]
        return list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if not self.info.has_chat_template:
            raise FuselmError(f"model {self.info.name!r} has no chat template; use --raw")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The BOS is added by tokenize(); a template that writes it too would double it.
        bos = self.tokenizer.bos_token
        if self._add_bos and bos and text.startswith(bos):
            text = text[len(bos) :]
        return text

    # --- forward passes -------------------------------------------------------------------------
    def new_cache(self):
        from transformers import DynamicCache

        cache = DynamicCache()
        self._held[cache] = []
        return cache

    def cached_ids(self, cache) -> list[int]:
        return list(self._held.get(cache, ()))

    def release(self, cache) -> None:
        self._held.pop(cache, None)  # the tensors go with the last reference to the cache

    def can_keep(self, cache) -> bool:
        return bool(self._held.get(cache))

    def revive(self, cache) -> bool:
        # Every layer must hold exactly the tracked tokens (an interrupted forward may have
        # filled only some of them).
        ids = self._held.get(cache)
        return bool(ids) and all(layer.is_initialized and layer.get_seq_length() == len(ids) for layer in cache.layers)

    def _ids(self, cache) -> list[int]:
        """Token ids held by `cache` (caches made elsewhere are not tracked: a throwaway list)."""
        return self._held.get(cache, [])

    def truncate(self, cache, length: int) -> None:
        current = cache.get_seq_length()
        if length < current:
            cache.crop(length - current)
        del self._ids(cache)[length:]

    @torch.inference_mode()
    def extend(self, cache, ids: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        logits = self._forward(cache, input_ids, logits_to_keep=0 if all_logits else 1)
        self._ids(cache).extend(ids)
        return log_softmax_f32(logits if all_logits else logits[-1]).cpu()

    def _forward(self, cache, input_ids: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        """One pass of `input_ids` [1, T] on top of `cache`: logits [T or logits_to_keep, V]. A
        prefill needs only its last position's logits (0 keeps all)."""
        return self.model(
            input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep
        ).logits[0]

    @torch.inference_mode()
    def _branch_logits(self, cache, keep: int, branches: Sequence[Sequence[int]]):
        """Logits [B, width, V] of all branches run on top of cache[:keep] in one batched pass,
        with the batch's input ids and cache."""
        from transformers import DynamicCache

        width = max(len(b) for b in branches)
        batch = len(branches)
        # Right padding needs no attention mask: causal attention never looks at later (pad) positions.
        input_ids = torch.zeros((batch, width), dtype=torch.long, device=self.device)
        for j, b in enumerate(branches):
            input_ids[j, : len(b)] = torch.tensor(list(b), dtype=torch.long)
        layers = []
        for layer in cache.layers:
            if keep == 0 or not layer.is_initialized:
                layers.append((None, None))
                continue
            k = layer.keys[:, :, :keep].expand(batch, -1, -1, -1)
            v = layer.values[:, :, :keep].expand(batch, -1, -1, -1)
            layers.append((k, v))
        branch_cache = DynamicCache(ddp_cache_data=layers) if keep > 0 else DynamicCache()
        out = self.model(input_ids=input_ids, past_key_values=branch_cache, use_cache=True)
        return out.logits, input_ids, branch_cache

    def _gather_scores(self, logits, input_ids, branches) -> list[torch.Tensor]:
        logprobs = log_softmax_f32(logits[:, :-1])  # [B, width-1, V]
        gathered = logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1).cpu()
        return [gathered[j, : max(len(b) - 1, 0)].clone() for j, b in enumerate(branches)]

    def score_branches(self, cache, keep: int, branches: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        if not branches or max(len(b) for b in branches) <= 1:
            return [torch.zeros(0) for _ in branches]
        # A branch's last token is never run: scores only need the rows before each token.
        logits, input_ids, _ = self._branch_logits(cache, keep, [b[:-1] if len(b) > 1 else b for b in branches])
        logprobs = log_softmax_f32(logits)
        return [
            logprobs[j, torch.arange(len(b) - 1), torch.tensor(list(b[1:]), dtype=torch.long)].cpu()
            for j, b in enumerate(branches)
        ]

    def fork_branches(self, cache, keep: int, branches: Sequence[Sequence[int]]) -> tuple[list[torch.Tensor], Forks]:
        lengths = [len(b) for b in branches]
        if not branches or min(lengths) == 0:
            return self.score_branches(cache, keep, branches), Forks(keep, lengths)
        logits, input_ids, branch_cache = self._branch_logits(cache, keep, branches)
        scores = self._gather_scores(logits, input_ids, branches)
        nexts = list(log_softmax_f32(torch.stack([logits[j, n - 1] for j, n in enumerate(lengths)])).cpu())
        # Only the branches' own positions are kept; the copied prefix is dropped with the batch.
        width = max(lengths)
        tails = [
            (layer.keys[:, :, keep : keep + width].clone(), layer.values[:, :, keep : keep + width].clone())
            if layer.is_initialized
            else None
            for layer in branch_cache.layers
        ]
        return scores, Forks(keep, lengths, [list(b) for b in branches], nexts, tails)

    def adopt(self, cache, forks: Forks, j: int) -> torch.Tensor | None:
        if not forks.available(j) or len(forks.state) != len(cache.layers) or None in forks.state:
            return None
        self.truncate(cache, forks.keep)
        n = forks.lengths[j]
        for layer, tail in zip(cache.layers, forks.state):
            k, v = tail[0][j : j + 1, :, :n], tail[1][j : j + 1, :, :n]
            if layer.is_initialized:
                layer.keys = torch.cat([layer.keys, k], dim=-2)
                layer.values = torch.cat([layer.values, v], dim=-2)
            else:
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k.clone(), v.clone()
        self._ids(cache).extend(forks.branches[j])
        return forks.next_logprobs[j]

    @torch.inference_mode()
    def branch_next_logprobs(self, cache, keep: int, branches: Sequence[Sequence[int]], batch=None):
        if not branches:
            return [], None
        # A rollout calls this once per step with every branch one token longer: the batch's cache
        # (`batch`, owned by the caller) carries over, so a step runs one token per branch.
        parents = [tuple(b[:-1]) for b in branches]
        lengths = {len(b) for b in branches}
        if (
            batch is not None
            and batch.key == (id(cache), cache.get_seq_length(), keep)
            and len(lengths) == 1
            and all(p in batch.rows for p in parents)
        ):
            branch_cache = batch.cache
            rows = torch.tensor([batch.rows[p] for p in parents], device=self.device)
            for layer in branch_cache.layers:
                if layer.is_initialized and layer.keys.numel():
                    layer.keys, layer.values = layer.keys[rows], layer.values[rows]
            input_ids = torch.tensor([[b[-1]] for b in branches], dtype=torch.long, device=self.device)
            out = self.model(input_ids=input_ids, past_key_values=branch_cache, use_cache=True)
            last = out.logits[:, -1]
        else:
            logits, _, branch_cache = self._branch_logits(cache, keep, branches)
            last = torch.stack([logits[j, len(b) - 1] for j, b in enumerate(branches)])
        state = None
        if len(lengths) == 1:  # no padding in the batch's cache: it can go on
            state = _BranchBatch(
                (id(cache), cache.get_seq_length(), keep), {tuple(b): j for j, b in enumerate(branches)}, branch_cache
            )
        return list(log_softmax_f32(last).cpu()), state


@dataclass
class _BranchBatch:
    """The key/values of a batch of branches after one step (see branch_next_logprobs)."""

    key: tuple[int, int, int]  # (cache, its length, keep) the branches continue
    rows: dict[tuple[int, ...], int]  # branch tokens -> row of the batch
    cache: object


def _tokenizer_adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == bos


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return ids
