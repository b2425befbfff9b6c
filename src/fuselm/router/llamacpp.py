"""A trained router on llama.cpp.

The router is a LoRA-adapted backbone plus a linear routing head on the final (normed) hidden
state. llama.cpp runs the backbone from its own GGUF with the LoRA adapters loaded as a GGUF
*adapter* (exported once from `router.safetensors` into the fuselm cache), and with embeddings
switched on it hands back, for each output position, the very hidden state that its LM head
reads, so the routing head is one small matrix product here. Per token that is one llama.cpp
forward of the router instead of a float32 transformers one (see docs/benchmarks.md).

Only LoRA routers over a GGUF backbone of a known layout (``qwen2``, ``llama``) run here; the
transformers engine runs every router.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import FuselmError
from ..files import atomic_path
from ..models import assets
from ..models.catalog import BUNDLED
from ..models.llamacpp import LlamaCppBackend, LlamaCppCache
from .model import WEIGHTS_FILE, RouterMeta, read_meta
from .routes import RouteRecorder

# PEFT module name -> llama.cpp tensor name (per block)
GGUF_TENSORS = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
# Architectures whose GGUF layout is known here. llama.cpp's converter permutes the rows of a
# llama model's q/k projections (rotary pairs interleaved); qwen2 keeps transformers' layout.
PERMUTED_QK = {"llama": True, "qwen2": False}
_LORA_KEY = re.compile(r"\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.default\.weight$")


def backbone_gguf(ref: str) -> Path | None:
    """The GGUF file of a router backbone reference (bundled name or .gguf path), if it has one."""
    if ref in BUNDLED:
        return assets.ensure_gguf(BUNDLED[ref])
    path = Path(ref).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file (its metadata only)."""
    from gguf import GGUFReader

    return str(_field(GGUFReader(str(path)), "general.architecture"))


def _permute_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for a llama model (what its converter does to the base weight)."""
    return b.reshape(n_head, 2, b.shape[0] // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def export_lora_gguf(
    weights: dict[str, torch.Tensor], meta: RouterMeta, arch: str, n_head: int, n_head_kv: int, out: Path
) -> None:
    """Write the router's LoRA adapters as a llama.cpp GGUF adapter at `out` (atomically).

    PEFT stores A as [r, in] and B as [out, r]; llama.cpp wants them as ``<name>.lora_a`` and
    ``<name>.lora_b`` with those numpy shapes, and scales by alpha / r like PEFT.
    """
    import gguf

    if meta.lora is None:
        raise FuselmError("the router has no LoRA adapters to export")
    if arch not in PERMUTED_QK:
        raise FuselmError(f"exporting a router's LoRA to llama.cpp supports {sorted(PERMUTED_QK)}, not {arch!r}")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, t in weights.items():
        if not key.startswith("backbone."):
            continue
        m = _LORA_KEY.search(key)
        if m is None:
            raise FuselmError(f"unexpected backbone tensor {key!r} in a LoRA router")
        block, module, ab = m.groups()
        if module not in GGUF_TENSORS:
            raise FuselmError(f"LoRA on {module!r} cannot be exported to llama.cpp (supported: {sorted(GGUF_TENSORS)})")
        arr = t.detach().float().cpu().numpy()
        if ab == "B" and PERMUTED_QK[arch] and module in ("q_proj", "k_proj"):
            arr = _permute_rows(arr, n_head if module == "q_proj" else n_head_kv)
        pairs.setdefault(f"blk.{block}.{GGUF_TENSORS[module]}.weight", {})[ab] = np.ascontiguousarray(arr)
    if not pairs:
        raise FuselmError("no LoRA tensors found in the router's weights")
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(meta.lora["alpha"]))
        for name, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                raise FuselmError(f"LoRA pair for {name} is missing a half")
            writer.add_tensor(f"{name}.lora_a", ab["A"])
            writer.add_tensor(f"{name}.lora_b", ab["B"])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


class LlamaCppRouterBackend(RouteRecorder, LlamaCppBackend):
    """A router on llama.cpp: records the route of the last position of every pass (the one
    a decoding step reads; a prefill computes no LM logits or routes before it)."""

    def __init__(
        self,
        gguf_path: Path,
        lora_gguf: Path,
        head_weight: torch.Tensor,
        head_bias: torch.Tensor,
        meta: RouterMeta,
        name: str = "router",
        n_ctx: int = 4096,
    ):
        super().__init__(gguf_path, name=name, n_ctx=n_ctx, embeddings=True)
        self.meta = meta
        self._init_routes()
        lc = self._llama_cpp
        self._adapter = lc.llama_adapter_lora_init(self._model.model, str(lora_gguf).encode())
        if not self._adapter:
            raise FuselmError(f"llama.cpp refused the router's LoRA adapter {lora_gguf} (wrong backbone?)")
        adapters = (lc.llama_adapter_lora_p_ctypes * 1)(self._adapter)
        scales = (ctypes.c_float * 1)(1.0)
        if lc.llama_set_adapters_lora(self._ctx.ctx, adapters, 1, scales) != 0:
            raise FuselmError(f"llama.cpp could not apply the router's LoRA adapter {lora_gguf}")
        self._n_embd = self._model.n_embd()
        if head_weight.shape[1] != self._n_embd:
            raise FuselmError(
                f"the routing head reads hidden states of size {head_weight.shape[1]}, "
                f"the GGUF backbone has {self._n_embd}"
            )
        self._head_w = head_weight.float()
        self._head_b = head_bias.float()

    @classmethod
    def load(cls, path: str | Path, n_ctx: int = 4096) -> LlamaCppRouterBackend:
        from safetensors.torch import load_file

        path = Path(path)
        meta = read_meta(path)
        base = backbone_gguf(meta.backbone)
        if base is None:
            raise FuselmError(f"router backbone {meta.backbone!r} has no GGUF file for llama.cpp")
        weights_file = path / WEIGHTS_FILE
        if not weights_file.is_file():
            raise FuselmError(f"{path} is not a saved router (no {WEIGHTS_FILE})")
        weights = load_file(str(weights_file))
        for key in ("route_head.weight", "route_head.bias"):
            if key not in weights:
                raise FuselmError(f"{weights_file} has no {key}")
        lora = _exported_lora(weights_file, weights, meta, base)
        return cls(
            base,
            lora,
            weights["route_head.weight"],
            weights["route_head.bias"],
            meta,
            name=f"router:{path.name}",
            n_ctx=n_ctx,
        )

    def extend(self, cache: LlamaCppCache, ids, all_logits: bool = False) -> torch.Tensor:
        ids = list(ids)
        # With embeddings on, llama.cpp outputs every token of a batch (LM head and logits copy
        # included): a 700-token prompt cost 700 LM-head rows. Only the last position is read,
        # so the rest of a prefill runs with embeddings off.
        if len(ids) > 1 and not all_logits:
            self._llama_cpp.llama_set_embeddings(self._ctx.ctx, False)
            super().extend(cache, ids[:-1])
            ids = ids[-1:]
        self._llama_cpp.llama_set_embeddings(self._ctx.ctx, True)
        out = super().extend(cache, ids, all_logits)
        # The hidden state of the last position run routes the token after it.
        ptr = self._llama_cpp.llama_get_embeddings_ith(self._ctx.ctx, -1)
        if not ptr:
            raise FuselmError("llama.cpp returned no hidden state for the router's last position")
        hidden = torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self._n_embd,)).copy())
        self._record_route(cache, cache.length, self._head_w @ hidden + self._head_b)
        return out

    def close(self) -> None:
        if getattr(self, "_adapter", None):
            self._llama_cpp.llama_adapter_lora_free(self._adapter)
            self._adapter = None
        super().close()


def _exported_lora(weights_file: Path, weights: dict[str, torch.Tensor], meta: RouterMeta, base: Path) -> Path:
    """The router's LoRA as a GGUF adapter in the cache, made once per router weights file."""
    from gguf import GGUFReader

    digest = hashlib.sha256(weights_file.read_bytes()).hexdigest()[:16]
    out = assets.cache_dir() / "router-lora" / f"{digest}.gguf"
    if out.is_file():
        return out
    reader = GGUFReader(str(base))
    arch = _field(reader, "general.architecture")
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    n_head_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
    export_lora_gguf(weights, meta, arch, n_head, n_head_kv, out)
    return out


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise FuselmError(f"GGUF metadata has no {key}")
        return default
    value = f.contents()
    return value
