"""Core request and event types shared by the engine and every protocol adapter.

Adapters translate a protocol body into one `GenerationRequest` and translate `GenerationEvent`s back; nothing else
crosses that boundary. `EngineAPI` is what an adapter may ask of the engine it is given (an `engine.Engine`, or the
server's `manager.ModelManager`, which is also a `ModelLibrary`). Defaults are KoboldCpp's where KoboldCpp has one (`gpttype_adapter.cpp`, `koboldcpp.py` at
7fb809b).
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Protocol, Sequence

# KoboldCpp's sampler ids, in its default order: 6 rep_pen, 0 top_k, 1 top_a, 3 tfs, 4 typical, 2 top_p, 5 temperature
# (min_p rides with top_p in KoboldCpp's order).
DEFAULT_SAMPLER_ORDER: tuple[int, ...] = (6, 0, 1, 3, 4, 2, 5)


@dataclass
class SamplingParams:
    """Every sampler setting a frontend can send. A value that disables a sampler leaves it out of the chain."""

    temperature: float = 0.7
    top_k: int = 100              # 0 = off
    top_p: float = 0.92           # 1.0 = off
    min_p: float = 0.0            # 0 = off
    typical_p: float = 1.0        # 1.0 = off
    tfs: float = 1.0              # 1.0 = off
    top_a: float = 0.0            # 0 = off
    repetition_penalty: float = 1.0   # 1.0 = off (KoboldCpp 1.76 API default; clients send their own)
    repetition_penalty_range: int = 320   # last N tokens considered; 0 or -1 = whole context
    repetition_penalty_slope: float = 1.0  # KoboldCpp: far half of the window gets 1+(pen-1)*slope; 1 = uniform
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    mirostat: int = 0             # 0 off, 1 = v1, 2 = v2
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    dynatemp_range: float = 0.0   # dynamic temperature: temperature +- range (0 = off)
    dynatemp_exponent: float = 1.0
    smoothing_factor: float = 0.0  # quadratic sampling (KoboldCpp 1.76): 0 = off
    smoothing_curve: float = 1.0   # 1 = plain quadratic; the cubic term of later KoboldCpp / text-generation-webui
    nsigma: float = 0.0           # top-nσ (KoboldCpp 1.85, llama.cpp top_n_sigma): <= 0 = off
    xtc_threshold: float = 0.2    # XTC: KoboldCpp's API default; > 0.5 = off
    xtc_probability: float = 0.0  # 0 = off
    dry_multiplier: float = 0.0   # DRY: 0 = off
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 320  # tokens of context searched; 0 or -1 = the whole context (KoboldCpp)
    dry_sequence_breakers: tuple[str, ...] = ()
    sampler_order: tuple[int, ...] = DEFAULT_SAMPLER_ORDER
    seed: Optional[int] = None    # None or -1 = random
    logit_bias: dict[int, float] = field(default_factory=dict)
    banned_tokens: tuple[int, ...] = ()
    banned_strings: tuple[str, ...] = ()   # KoboldCpp 1.76 banned_tokens strings: 1 character = a vocabulary ban,
                                           # anything longer = a phrase ban with backtracking (engine)
    ban_eos: bool = False
    grammar: Optional[str] = None  # GBNF source

    def replace(self, **changes: Any) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


class FinishReason(str, enum.Enum):
    EOS = "eos"          # the model produced its end-of-sequence token
    STOP = "stop"        # a stop string matched
    LENGTH = "length"    # max_tokens reached, or the context is full
    ABORTED = "aborted"  # abort() or the client went away


@dataclass
class GenerationRequest:
    """One generation, protocol-neutral. Exactly one of `prompt` / `tokens` is set."""

    prompt: Optional[str] = None
    tokens: Optional[Sequence[int]] = None
    max_tokens: int = 128                  # KoboldCpp's max_length default is 100; adapters set their own
    stop: tuple[str, ...] = ()
    trim_stop: bool = True                 # drop the matched stop string from the output
    render_special: bool = False           # print control tokens (</s>, <|im_end|>) as their text (KoboldCpp)
    add_bos: bool = True
    sampling: SamplingParams = field(default_factory=SamplingParams)
    memory: Optional[str] = None           # text kept at the start when the context is shifted (KoboldAI 'memory')
    allow_context_shift: bool = True
    echo: bool = False
    n_probs: int = 0                       # return the top-n token probabilities with each token
    post_sampling_probs: bool = False      # ... of the sampler's final candidates (KoboldCpp), not the raw model
    bypass_eos: bool = False               # KoboldCpp: the end token is never banned and ends nothing (it is
                                           # kept, printed only with render_special, and generation goes on)
    grammar_retain_state: bool = False     # KoboldCpp: the same grammar as the last generation's goes on from
                                           # where that one left it instead of from its start
    genkey: Optional[str] = None           # KoboldCpp multiuser key: abort/check address this request
    request_id: Optional[str] = None


@dataclass
class GenerationEvent:
    """A piece of output. `text` is always whole UTF-8 characters; `finish_reason` is set on the last event only."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: Optional[FinishReason] = None
    prompt_tokens: int = 0                 # filled on the last event
    completion_tokens: int = 0             # filled on the last event
    cached_tokens: int = 0                 # last event: prompt tokens whose K/V were reused, not evaluated
    prompt_seconds: float = 0.0            # last event: time spent on the prompt
    generation_seconds: float = 0.0        # last event: time spent generating
    logprobs: Optional[list[dict[str, Any]]] = None


class EngineAPI(Protocol):
    """The engine as the adapters and the server see it (engine.Engine; manager.ModelManager passes each call to the
    loaded model's Engine)."""

    def generate(self, req: GenerationRequest) -> Iterator[GenerationEvent]:
        """Queue `req` (EngineBusy when the queue is full; RequestError before any event) and yield its events."""

    def abort(self, genkey: Optional[str] = None) -> bool:
        """Stop the running generation, or the one with this genkey / request id; True when one was stopped."""

    def embed(self, inputs: list, normalize: bool = True) -> list:
        """Embedding vectors of token lists (llama.cpp's --pooling mean), in the generation slot's turn."""

    def tokenize(self, text: Any, add_bos: bool = True) -> list[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...

    def partial_text(self, genkey: Optional[str] = None) -> str:
        """The text generated so far by the running generation (only its own genkey sees it)."""

    def last_logprobs(self, genkey: Optional[str] = None) -> Optional[list]: ...

    def perf(self) -> dict:
        """Facts of the last generation and the queue, times in seconds: last_process / last_eval (its prompt's
        and its tokens' time), last_input_count / last_process_count / last_cached_count (its prompt tokens: in all,
        evaluated, reused from the cache), last_token_count, last_seed, stop_reason (a FinishReason; None before
        the first), total_gens, queue (requests waiting), idle (a bool), uptime, idletime (seconds idle)."""

    def model_info(self) -> dict:
        """name, mix, n_ctx, n_vocab, n_embd, template, ...; ModelNotLoaded without a model."""

    def format_chat(self, messages: list[dict], tools: Optional[list[dict]] = None) -> str:
        """The messages rendered in the model's chat template."""

    def save_slot(self, slot: int, filename: str) -> dict: ...

    def restore_slot(self, slot: int, filename: str) -> dict: ...

    def erase_slot(self, slot: int) -> dict: ...

    def slots_info(self) -> list[dict]:
        """Per generation slot (--parallel N): id, n_ctx, is_processing, tokens cached (llama.cpp's GET /slots)."""

    def metrics(self) -> dict:
        """Token and time totals, requests processing / deferred, KV cache use (llama.cpp's GET /metrics)."""


class ModelLibrary(EngineAPI, Protocol):
    """An engine that can list, load and unload the models of a folder (manager.ModelManager)."""

    startup_name: Optional[str]

    def list_models(self, include_unreadable: bool = False) -> list[dict]: ...

    def load(self, name: str, **options: Any) -> Any: ...

    def start_load(self, name: str, **options: Any) -> Any: ...

    def unload(self, *, abort_running: bool = False) -> None: ...


def is_model_library(engine: EngineAPI) -> bool:
    """Whether `engine` is a ModelLibrary, looked up on its class (an engine's attribute forwarding does not count)."""
    return all(callable(getattr(type(engine), m, None)) for m in ("list_models", "load", "start_load", "unload"))
