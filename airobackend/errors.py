"""The project's exception family.

Adapters map these to protocol error envelopes *by class*, never by message text.
"""
from __future__ import annotations

from .kernels.ggml_types import UnsupportedType


class AiroError(Exception):
    """Base class of every error airobackend raises on purpose."""


class ModelFileError(AiroError):
    """A model file that cannot be read: bad magic, unknown version or type, truncation, hostile counts.

    The message always names the file and, where known, the byte offset and the tensor.
    """

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None,
                 tensor: str | None = None) -> None:
        where = []
        if path is not None:
            where.append(str(path))
        if offset is not None:
            where.append(f"offset {offset}")
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)
        self.path, self.offset, self.tensor = path, offset, tensor


class UnsupportedTensorType(ModelFileError, UnsupportedType):
    """A tensor type the engine cannot compute with (named in the message). Also the kernels' `UnsupportedType`,
    which the model loader turns into this one, adding the file."""


class RequestError(AiroError, ValueError):
    """A generation request that is invalid (bad field value, unknown sampler id, ...). Maps to HTTP 400/422."""


class FieldError(RequestError):
    """A request field with the wrong type or value; `param` names it (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def check_token_ids(ids: list[int], n_vocab: int, where: str, param: str | None = None) -> list[int]:
    """`ids` when every one is a token id of the vocabulary, else a FieldError naming `where` and the first bad id."""
    bad = [t for t in ids if not 0 <= t < n_vocab]
    if bad:
        raise FieldError(f"'{where}': token id {bad[0]} is outside 0..{n_vocab - 1}", param or where)
    return ids


class ContextOverflowError(RequestError):
    """The prompt (plus what must be kept) does not fit in the context and shifting is not allowed."""


class EngineBusy(AiroError):
    """The request queue is full (KoboldCpp answers 503 'Server is busy')."""


class ModelNotLoaded(AiroError):
    """No model is loaded (after an unload, or while a switch is in progress)."""


class InsufficientMemory(AiroError):
    """Loading would need more RAM than is available (the message gives both numbers)."""


class BackendUnavailable(AiroError):
    """A part of the model on another machine (a pipeline stage or a replica, on Ray) failed or is restarting; the
    request cannot be served now (503). The message names the part and the node."""
