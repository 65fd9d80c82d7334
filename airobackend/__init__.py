"""airobackend: GGML/GGUF LLaMA models on a Numba CPU engine, served to the chat frontends people already use.

Importing the package is cheap: heavy modules (numba kernels, the server) load on first use.
"""
from __future__ import annotations

from airobackend.paths import use_cache_root as _use_cache_root

# Before any kernel module can be imported: Numba's cache goes under the one cache root (airobackend.paths).
_use_cache_root()

from airobackend.errors import (AiroError, ContextOverflowError, EngineBusy, ModelFileError, RequestError,
                                UnsupportedTensorType)
from airobackend.types import FinishReason, GenerationEvent, GenerationRequest, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "Llama", "open_model", "GenerationRequest", "GenerationEvent", "SamplingParams", "FinishReason",
    "AiroError", "ModelFileError", "UnsupportedTensorType", "RequestError", "ContextOverflowError", "EngineBusy",
    "__version__",
]


def __getattr__(name: str):
    # On first use (PEP 562): Llama brings Numba and open_model NumPy, which `import airobackend` does without.
    if name == "Llama":
        from airobackend.llama import Llama
        return Llama
    if name == "open_model":
        from airobackend.formats import open_model
        return open_model
    raise AttributeError(f"module 'airobackend' has no attribute {name!r}")
