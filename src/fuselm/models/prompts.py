"""What a user prompt is, and when it goes through a chat template (shared by in-process models
and models on an engine, which render the template on their side)."""

from __future__ import annotations

from ..config import GenerationConfig
from ..errors import FuselmError

# A prompt: a text, or a conversation as role/content messages (rendered with the chat template).
Prompt = str | list[dict[str, str]]


def chat_messages(prompt: Prompt, gen: GenerationConfig, has_chat_template: bool) -> list[dict[str, str]] | None:
    """The conversation to render with the chat template, or None for a prompt fed as raw text
    (per `gen.chat`). A conversation always goes through the template, with `gen.system` first
    when it has no system message of its own."""
    if isinstance(prompt, list):
        if gen.chat == "raw":
            raise FuselmError("a conversation needs the chat template; it cannot be fed as raw text")
        messages = list(prompt)
    else:
        use_chat = gen.chat == "chat" or (gen.chat == "auto" and has_chat_template)
        if not use_chat:
            return None
        messages = [{"role": "user", "content": prompt}]
    if gen.system and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": gen.system})
    return messages
