"""Built-in tasks: one module each registers its task(s)."""

from . import flores, gsm8k, humaneval, qa  # noqa: F401
