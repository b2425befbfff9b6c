"""Stand-in for SGLang's ``sgl_kernel`` package, for running SGLang on a CPU-only machine.

SGLang imports ``sgl_kernel`` (its compiled CUDA/CPU kernels) at module level in many
places, but the CPU build of those kernels is not published on PyPI, and the PyPI
``sgl-kernel`` wheels are CUDA builds. With this stand-in on PYTHONPATH every
``from sgl_kernel import X`` succeeds, and with ``SGLANG_USE_CPU_ENGINE=1`` and
``--device cpu`` SGLang's CPU engine runs its torch-native fallbacks instead of these
kernels. Should a code path really call one of them, it raises ``NotImplementedError``
naming the function, rather than failing silently.

Checked only with SmolLM2-135M (Llama architecture); other architectures may reach a
kernel that has no torch-native fallback. Installed by scripts/setup_sglang.sh.
"""

__version__ = "0.0.0-stub"


def __getattr__(name):
    # Dunder look-ups (__path__, __file__, __wrapped__, ...) must fail normally, or
    # importlib, inspect and pickle would mistake this module for something it is not.
    if name.startswith("__"):
        raise AttributeError(name)

    def _missing(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel stand-in (fuselm scripts/sglang_cpu): {name} called; "
            "SGLang's CPU kernels are not installed, only its torch-native fallbacks work"
        )

    _missing.__name__ = name
    _missing.__qualname__ = name
    return _missing
