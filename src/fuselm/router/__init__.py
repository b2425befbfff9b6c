"""FusionRoute (arXiv 2601.05106): a small router LM that picks one expert per token and fuses its
next-token distribution with the expert's."""

from __future__ import annotations

from .losses import cdpo_loss, combine_logprobs, informative_mask, routing_accuracy, sequence_logprob, sft_loss
from .model import RouterMeta, RouterModel, RouterOutput, add_lora, load_router, read_meta, save_router

__all__ = [
    "RouterMeta",
    "RouterModel",
    "RouterOutput",
    "add_lora",
    "cdpo_loss",
    "combine_logprobs",
    "informative_mask",
    "load_router",
    "routing_accuracy",
    "read_meta",
    "save_router",
    "sequence_logprob",
    "sft_loss",
]
