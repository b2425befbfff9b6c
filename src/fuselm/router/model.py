"""The FusionRoute router (arXiv 2601.05106): a causal LM over the experts' shared vocabulary with
one extra linear head that scores the experts at every position.

At each step the expert with the highest routing weight is selected and the next token is drawn
from softmax(log p_router + log p_expert) (see :func:`fuselm.router.losses.combine_logprobs`).

A trained router is stored as a directory with `router.safetensors` (only the trainable weights:
route head plus LoRA adapters, or route head plus the whole backbone without LoRA) and
`router.json` (:class:`RouterMeta`). The backbone's base weights are not stored: the caller
rebuilds the backbone from `RouterMeta.backbone` and passes it to :func:`load_router`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import FuselmError
from ..files import atomic_path

WEIGHTS_FILE = "router.safetensors"
META_FILE = "router.json"
# The attention projections of Llama-family models (Llama, Qwen2, Gemma3, Mistral...).
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class RouterOutput:
    """One forward pass: the router LM's logits [B, T, V] and the routing logits [B, T, E].

    Position t of both predicts/routes the token at t+1."""

    lm_logits: Tensor
    route_logits: Tensor
    past_key_values: Any = None


class RouterModel(nn.Module):
    """A causal LM backbone (optionally peft-wrapped) plus a float32 linear routing head."""

    def __init__(self, backbone: nn.Module, n_experts: int):
        super().__init__()
        if n_experts < 1:
            raise FuselmError(f"a router needs at least one expert, got {n_experts}")
        self.backbone = backbone
        hidden = int(backbone.config.get_text_config(decoder=True).hidden_size)
        self.route_head = nn.Linear(hidden, n_experts, dtype=torch.float32)
        # Small weights and zero bias: routing starts close to uniform instead of at a random favourite.
        nn.init.normal_(self.route_head.weight, std=0.01)
        nn.init.zeros_(self.route_head.bias)
        device = _backbone_device(backbone)
        if device is not None:
            self.route_head.to(device)

    @property
    def n_experts(self) -> int:
        return self.route_head.out_features

    @property
    def vocab_size(self) -> int:
        return _vocab_size(self.backbone)

    @property
    def has_lora(self) -> bool:
        return _is_peft(self.backbone)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> RouterOutput:
        """`logits_to_keep=n` computes LM logits for the last n positions only (0: all); routing
        logits are always computed for every position (they are cheap: one row per expert)."""
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_hidden_states=True,
            logits_to_keep=logits_to_keep,
        )
        # The last entry is the final (normed) hidden state that the LM head also reads.
        hidden = out.hidden_states[-1]
        route_logits = self.route_head(hidden.to(self.route_head.weight.dtype))
        return RouterOutput(out.logits, route_logits, out.past_key_values if use_cache else None)

    def lm_parameters(self) -> list[nn.Parameter]:
        """Trainable backbone parameters: the LoRA adapters with LoRA, otherwise every backbone parameter."""
        if self.has_lora:
            return [p for p in self.backbone.parameters() if p.requires_grad]
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.route_head.parameters())


def add_lora(
    router: RouterModel,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
) -> RouterModel:
    """Wrap the router's backbone with LoRA adapters (base weights frozen); the route head stays trainable."""
    from peft import LoraConfig, get_peft_model

    if router.has_lora:
        raise FuselmError("the router's backbone already has LoRA adapters")
    targets = list(target_modules) if target_modules else list(DEFAULT_LORA_TARGETS)
    names = {name.rsplit(".", 1)[-1] for name, _ in router.backbone.named_modules()}
    if not names.intersection(targets):
        raise FuselmError(f"no LoRA target module ({', '.join(targets)}) in the backbone; pass target_modules")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    router.backbone = get_peft_model(router.backbone, config)
    router.route_head.requires_grad_(True)
    return router


def _lora_settings(router: RouterModel) -> dict[str, Any] | None:
    """The LoRA settings of `router` in RouterMeta's format, or None without LoRA."""
    if not router.has_lora:
        return None
    config = router.backbone.peft_config["default"]
    return {
        "r": int(config.r),
        "alpha": config.lora_alpha,
        "dropout": float(config.lora_dropout),
        "target_modules": sorted(config.target_modules),
    }


@dataclass
class RouterMeta:
    """What `router.json` records: enough to rebuild the router and check it fits its experts."""

    backbone: str  # a name or path the caller uses to rebuild the base backbone
    experts: list[str]
    vocab_size: int
    vocab_fingerprint: str
    lora: dict[str, Any] | None = None  # r, alpha, dropout, target_modules
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RouterMeta":
        try:
            lora = data.get("lora")
            if lora is not None:
                lora = {
                    "r": int(lora["r"]),
                    "alpha": lora["alpha"],
                    "dropout": float(lora["dropout"]),
                    "target_modules": [str(m) for m in lora["target_modules"]],
                }
            return cls(
                backbone=str(data["backbone"]),
                experts=[str(e) for e in data["experts"]],
                vocab_size=int(data["vocab_size"]),
                vocab_fingerprint=str(data["vocab_fingerprint"]),
                lora=lora,
                extra=dict(data.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FuselmError(f"invalid router metadata ({type(e).__name__}: {e})") from e


def trainable_state(router: RouterModel) -> dict[str, Tensor]:
    """The tensors that `save_router` stores, keyed by their names in the router; values share storage
    with the router's parameters.

    Without LoRA the whole backbone state is included, each tied tensor once (safetensors refuses
    shared storage, and the tie is rebuilt by the fresh backbone anyway).
    """
    state: dict[str, Tensor] = {f"route_head.{k}": v for k, v in router.route_head.state_dict().items()}
    if router.has_lora:
        for name, p in router.backbone.named_parameters():
            if p.requires_grad:
                state[f"backbone.{name}"] = p.detach()
        return state
    seen: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
    for name, t in router.backbone.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        state[f"backbone.{name}"] = t
    return state


def save_router(router: RouterModel, directory: str | Path, meta: RouterMeta) -> None:
    """Write `router.safetensors` (trainable weights only) and `router.json` into `directory`, each atomically.

    `meta.lora` is written from the router's actual adapters, whatever the caller put there."""
    from safetensors.torch import save_file

    if len(meta.experts) != router.n_experts:
        raise FuselmError(f"meta lists {len(meta.experts)} experts but the router routes to {router.n_experts}")
    if meta.vocab_size != router.vocab_size:
        raise FuselmError(f"meta says vocabulary size {meta.vocab_size} but the router has {router.vocab_size}")
    meta = replace(meta, lora=_lora_settings(router))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in trainable_state(router).items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "fuselm": "router"})
    with atomic_path(directory / META_FILE) as tmp:
        tmp.write_text(meta.to_json() + "\n", encoding="utf-8")


def read_meta(directory: str | Path) -> RouterMeta:
    """The `router.json` of a router directory."""
    meta_file = Path(directory) / META_FILE
    if not meta_file.is_file():
        raise FuselmError(f"not a router directory (no {META_FILE}): {directory}")
    try:
        return RouterMeta.from_dict(json.loads(meta_file.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as e:
        raise FuselmError(f"cannot read {meta_file}: {e}") from e


def load_router(directory: str | Path, backbone: nn.Module) -> tuple[RouterModel, RouterMeta]:
    """Rebuild a saved router on `backbone`, a freshly loaded base model (no LoRA yet).

    LoRA adapters are recreated from the metadata, then every saved tensor is copied in; the saved
    and expected sets of tensors must match exactly.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
    if not directory.is_dir():
        raise FuselmError(f"router directory {directory} does not exist")
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise FuselmError(f"{directory} is not a saved router (no {path.name})")
    meta = read_meta(directory)
    if _is_peft(backbone):
        raise FuselmError("load_router needs the base backbone; this one already has LoRA adapters")
    vocab = _vocab_size(backbone)
    if vocab != meta.vocab_size:
        raise FuselmError(
            f"the router in {directory} was trained on a vocabulary of {meta.vocab_size} tokens, "
            f"the backbone has {vocab}; load backbone {meta.backbone!r}"
        )
    router = RouterModel(backbone, len(meta.experts))
    if meta.lora is not None:
        lora = meta.lora
        add_lora(router, lora["r"], lora["alpha"], lora["dropout"], lora["target_modules"])
    try:
        saved = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise FuselmError(f"cannot read {weights_path}: {e}") from e
    expected = trainable_state(router)
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    if missing or unexpected:
        raise FuselmError(
            f"{weights_path} does not fit this backbone: {len(missing)} missing tensors ({_first(missing)}), "
            f"{len(unexpected)} unexpected ({_first(unexpected)})"
        )
    for name, target in expected.items():
        if tuple(saved[name].shape) != tuple(target.shape):
            raise FuselmError(
                f"{weights_path}: tensor {name} has shape {tuple(saved[name].shape)}, "
                f"the backbone expects {tuple(target.shape)}"
            )
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(saved[name])
    return router, meta


# --- helpers ------------------------------------------------------------------------------------


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def _vocab_size(model: nn.Module) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def _backbone_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


def _first(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "") if names else "none"
