"""Llama: the llama-cpp-python-compatible facade over a model file, its tokenizer and the forward pass.

This file holds the constructor and the low-level API (`eval`, `scores`, `n_tokens`, `reset`, `tokenize`, ...).
The high-level generation API (`create_completion`, `__call__`, `create_chat_completion`) is added to the same
class by the generation code; it builds only on the names below.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
import uuid
from typing import Any, Callable, Iterator, Optional, Sequence

import numba
import numpy as np

from airobackend import speculative
from airobackend.chat import stop_strings
from airobackend.cluster import start_stages
from airobackend.embeddings import embeddings_response, token_inputs
from airobackend.engine import Engine
from airobackend.errors import ContextOverflowError, RequestError
from airobackend.formats import open_model
from airobackend.json_schema import response_format_schema, schema_to_grammar
from airobackend.kvstate import StateFileError, model_fingerprint, state_bytes, state_from_bytes
from airobackend.model import LlamaModel
from airobackend.openai_shapes import (ChatDeltas, CompletionDeltas, Envelope, chat_choice, chat_logprobs,
                                       completion_choice, completion_logprobs, finish_reason, usage)
from airobackend.rope import apply_rope
from airobackend.settings import Settings
from airobackend.tokenizer import Tokenizer
from airobackend.tools import answer_message, parse_tools
from airobackend.types import GenerationRequest, SamplingParams

log = logging.getLogger("airobackend.llama")


def default_n_threads() -> int:
    """Threads to use when none are given: every CPU this process may run on (capped by Numba's pool)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:                      # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, numba.config.NUMBA_NUM_THREADS))


class Llama:
    """Load a LLaMA model file (GGUF or GGML v1-v3) and evaluate tokens, with llama-cpp-python's names.

    Args:
        model_path: path of the .gguf / .bin file (or a split .zip).
        n_ctx: context length (KV cache size in tokens); 0 = the model's training context.
        n_threads: compute threads; None or 0 = all CPUs this process may use.
        n_batch: tokens per forward pass when evaluating a prompt.
        seed: RNG seed for sampling (-1 = random); kept as `self.seed` for the generation code.
        logits_all: keep the logits of every evaluated position in `scores` (else only the last one's row).
        n_gqa, rms_norm_eps, rope_freq_base, rope_freq_scale: overrides for what GGML v3 files cannot store
            (LLaMA-2 70B needs n_gqa=8); None = from the file, else llama.cpp's defaults. With neither RoPE value
            given and n_ctx beyond the trained context, the RoPE base is raised as KoboldCpp does (airobackend.rope;
            `self.rope` says what was chosen).
        type_k, type_v: KV cache types: 'f16' (default), 'q8_0', 'q4_0', or ggml's type numbers as llama-cpp-python
            takes them (1, 8, 2). A quantized cache attends as llama.cpp's flash attention (flash_attn is implied).
        cache_reuse: reuse cached runs of at least this many tokens at new positions (context shift of a trimmed
            prompt, llama.cpp's --cache-reuse); 0 = only an exact prefix. Default 32.
        cache_slots, prompt_cache_mb: keep up to this many KV states of other prompts in RAM, in at most this many
            MiB (default: none, as llama-cpp-python until `set_cache`).
        prompt_cache_dir: keep KV states on disk too (they survive the process).
        verbose: log loading details at INFO level (else DEBUG).
        kernels: 'auto' | 'generic' | 'fast' matmul kernels (None = AIRO_KERNELS or 'auto').
        progress_callback: called with the loaded fraction (0..1) while the weights are prepared.
        draft_model: speculative decoding (airobackend.speculative): the path of a smaller model with the same
            vocabulary (checked here: ModelFileError if it differs), or a drafter object (`PromptLookup`,
            `DraftModel`, or llama-cpp-python's `LlamaDraftModel` interface: `drafter(input_ids) -> token ids`).
        draft_n: the most tokens drafted at a time (for a draft model given by path, and for lookup_ngram).
        draft_p_min: a draft model given by path stops drafting after a token it gives less than this probability.
        lookup_ngram: without draft_model, N > 0 drafts by prompt lookup: the tokens that followed the last earlier
            occurrence of the context's final N tokens.
        ray, stages: evaluate the layers in `stages` pipeline stages on the Ray cluster at `ray` ('host:port' of
            `ray start --head`, 'auto', or 'local'; needs the [ray] extra): each stage maps only its own layers from
            its node's copy of the file (airobackend.cluster). stages=1 without ray: the layers run here.
        ray_options: more for airobackend.cluster.start_stages (allow_disk, cpus, restarts).
        **kwargs: other llama-cpp-python arguments (n_gpu_layers, use_mlock, ...) are accepted and ignored.
    """

    def __init__(self, model_path: str, n_ctx: int = 512, n_threads: Optional[int] = None, n_batch: int = 512,
                 seed: int = -1, logits_all: bool = False, n_gqa: Optional[int] = None,
                 rms_norm_eps: Optional[float] = None, rope_freq_base: Optional[float] = None,
                 rope_freq_scale: Optional[float] = None, verbose: bool = True, kernels: Optional[str] = None,
                 progress_callback: Optional[Callable[[float], None]] = None, type_k: Any = None,
                 type_v: Any = None, cache_reuse: int = 32, cache_slots: int = 4, prompt_cache_mb: int = 0,
                 prompt_cache_dir: Optional[str] = None, draft_model: Any = None, draft_n: int = 8,
                 draft_p_min: float = 0.75, lookup_ngram: int = 0, ray: Optional[str] = None, stages: int = 1,
                 ray_options: Optional[dict] = None, **kwargs: Any) -> None:
        level = logging.INFO if verbose else logging.DEBUG
        self.chat_format: Optional[str] = kwargs.pop("chat_format", None)   # prompt template name (airobackend.chat)
        if kwargs:
            log.debug("ignoring llama-cpp-python arguments without meaning here: %s", sorted(kwargs))
        t0 = time.perf_counter()
        self.model_path = str(model_path)
        self.verbose = verbose
        self.seed = seed
        self.logits_all = bool(logits_all)
        self.n_batch = int(n_batch)
        self.n_threads = int(n_threads) if n_threads else default_n_threads()
        self.model_file = open_model(self.model_path, n_gqa=n_gqa, rms_norm_eps=rms_norm_eps,
                                     rope_freq_base=rope_freq_base, rope_freq_scale=rope_freq_scale)
        n_ctx = int(n_ctx) or int(self.model_file.hparams.n_ctx_train)
        self.rope = apply_rope(self.model_file, n_ctx, rope_freq_base, rope_freq_scale, level)
        self._cache_settings = dict(cache_reuse=int(cache_reuse), cache_slots=int(cache_slots),
                                    prompt_cache_mb=prompt_cache_mb, prompt_cache_dir=prompt_cache_dir)
        try:
            kv = dict(type_k="f16" if type_k is None else type_k, type_v="f16" if type_v is None else type_v)
            if ray:
                self.model_file.close()
                # The stages open their own copies of the file: they get the RoPE chosen here, as overrides.
                # Threads: as given, else each node uses its own CPUs (0).
                self.model = start_stages(ray, self.model_path, int(stages), n_ctx=n_ctx, n_threads=int(n_threads or 0),
                                          n_batch=self.n_batch, kernels=kernels, file_options=dict(
                                              n_gqa=n_gqa, rms_norm_eps=rms_norm_eps,
                                              rope_freq_base=self.rope.rope_freq_base,
                                              rope_freq_scale=self.rope.rope_freq_scale), **kv, **(ray_options or {}))
                self.model_file = self.model.mf
            elif int(stages) != 1:
                raise RequestError("pipeline stages need a Ray cluster: give ray='host:port' (or 'local')")
            else:
                self.model = LlamaModel(self.model_file, n_ctx=n_ctx, n_threads=self.n_threads,
                                        n_batch=self.n_batch, kernels=kernels, progress=progress_callback, **kv)
        except BaseException:
            self.model_file.close()
            raise
        self._tokenizer = None
        try:
            self.draft_model = self._drafter(draft_model, draft_n, draft_p_min, lookup_ngram, kernels)
        except BaseException:
            self.model_file.close()
            raise
        self.n_tokens = 0
        self.input_ids = np.zeros(self.model.n_ctx, dtype=np.intc)
        self.scores = np.zeros((self.model.n_ctx, self.model.n_vocab), dtype=np.single)
        log.log(level, "loaded %s (%s %s, %d layers, n_embd %d, n_head %d/%d kv) in %.2f s; n_ctx %d (KV cache "
                "%s/%s, %.0f MiB), %d threads", self.model_path, self.model_file.format, self.model_file.mix_name,
                self.model.n_layer, self.model.n_embd, self.model.n_head, self.model.n_head_kv,
                time.perf_counter() - t0, self.model.n_ctx, self.model.type_k, self.model.type_v,
                self.model.cache.nbytes / 2**20, self.n_threads)

    def _drafter(self, draft_model: Any, draft_n: int, p_min: float, lookup_ngram: int, kernels: Optional[str]) -> Any:
        """The drafter for speculative decoding that the arguments ask for, or None."""
        if isinstance(draft_model, (str, os.PathLike)):
            draft_model = speculative.DraftModel(os.fspath(draft_model), num_pred_tokens=draft_n, p_min=p_min,
                                                 n_ctx=self.model.n_ctx, n_threads=self.n_threads,
                                                 n_batch=self.n_batch, kernels=kernels)
            try:
                draft_model.check_vocab(self.tokenizer)
            except BaseException:
                draft_model.close()
                raise
        elif draft_model is None and lookup_ngram and int(lookup_ngram) > 0:
            draft_model = speculative.PromptLookup(ngram=int(lookup_ngram), num_pred_tokens=draft_n)
        elif draft_model is not None and hasattr(draft_model, "check_vocab"):
            draft_model.check_vocab(self.tokenizer)
        return draft_model

    # ---- low-level API ----

    def eval(self, tokens: Sequence[int]) -> None:
        """Evaluate `tokens` after the `n_tokens` already in the context; fills `scores` and `input_ids`.

        Raises ContextOverflowError (nothing is evaluated) when they do not fit in n_ctx.
        """
        tokens = np.asarray(tokens, dtype=np.intc).reshape(-1)
        n = tokens.shape[0]
        if n == 0:
            return
        if self.n_tokens + n > self.model.n_ctx:
            raise ContextOverflowError(
                f"{self.n_tokens} tokens in the context + {n} new exceed n_ctx = {self.model.n_ctx}")
        logits = self.model.eval(tokens, self.n_tokens, logits_all=self.logits_all)
        self.input_ids[self.n_tokens:self.n_tokens + n] = tokens
        if self.logits_all:
            self.scores[self.n_tokens:self.n_tokens + n] = logits
        else:
            self.scores[self.n_tokens + n - 1] = logits[-1]
        self.n_tokens += n

    @property
    def _input_ids(self) -> np.ndarray:
        """The tokens in the context: input_ids[:n_tokens]."""
        return self.input_ids[:self.n_tokens]

    @property
    def _scores(self) -> np.ndarray:
        """The valid rows of scores: scores[:n_tokens] (all of them only with logits_all)."""
        return self.scores[:self.n_tokens]

    def reset(self) -> None:
        """Forget the context (the KV cache is simply overwritten by the next eval)."""
        self.n_tokens = 0

    def n_ctx(self) -> int:
        return self.model.n_ctx

    def n_vocab(self) -> int:
        return self.model.n_vocab

    def n_embd(self) -> int:
        return self.model.n_embd

    @property
    def tokenizer(self):
        """The model's tokenizer (airobackend.tokenizer.Tokenizer), built on first use."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_model_file(self.model_file)
        return self._tokenizer

    def warmup(self, report: Optional[Callable[[str, bool], None]] = None) -> float:
        """Compile (or load from Numba's on-disk cache) every kernel the model and its tokenizer use, so that the
        first request runs as fast as the next (LlamaModel.warmup: `report(line, done)` hears of each group).
        Returns the seconds it took; the context is left empty."""
        seconds = self.model.warmup(report, extra=[("tokenizer kernels", self.tokenizer.warmup)])
        self.reset()
        warm_draft = getattr(self.draft_model, "warmup", None)
        if warm_draft is not None:
            seconds += warm_draft(report)
        return seconds

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of `text` (UTF-8 bytes), with BOS first when add_bos."""
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        """The bytes of `tokens` (control tokens such as BOS give nothing)."""
        return self.tokenizer.decode(list(tokens))

    def token_bos(self) -> int:
        return int(self.model_file.hparams.bos_id)

    def token_eos(self) -> int:
        return int(self.model_file.hparams.eos_id)

    # ---- KV state (llama-cpp-python's save_state / load_state) ----

    @property
    def state_identity(self) -> dict:
        """What a KV state file records about the model it belongs to (airobackend.kvstate)."""
        ident = self.__dict__.get("_state_identity")
        if ident is None:
            m = self.model
            ident = self._state_identity = dict(
                fingerprint=model_fingerprint(self.model_file), model_name=os.path.basename(self.model_path),
                runtime=dict(rope_freq_base=m.freq_base, rope_freq_scale=m.freq_scale, rms_norm_eps=m.eps))
        return ident

    def save_state(self) -> "LlamaState":
        """The context as it is (tokens, last logits, KV cache of the first n_tokens positions), as
        llama-cpp-python's LlamaState; `llama_state` is a KV state file's bytes, refused by any other model."""
        n = self.n_tokens
        data = state_bytes(tokens=self.input_ids[:n].tolist(), snapshot=self.model.cache.snapshot(n),
                           **self.state_identity)
        return LlamaState(input_ids=self.input_ids.copy(), scores=self._scores.copy(), n_tokens=n,
                          llama_state=data, llama_state_size=len(data), seed=self.seed)

    def load_state(self, state: "LlamaState") -> None:
        """Restore a `save_state()` result. StateFileError (a ValueError) if it belongs to another model or is
        damaged; then nothing changes."""
        tokens, snap = state_from_bytes(bytes(state.llama_state), **self.state_identity)
        why = self.model.cache.compatible(snap)
        if why is not None:
            raise StateFileError(f"the state cannot be restored here: {why}")
        self.model.cache.restore(snap)
        n = len(tokens)
        self.input_ids[:] = 0
        self.input_ids[:n] = tokens
        rows = np.asarray(state.scores)[:n]
        self.scores[:rows.shape[0]] = rows
        self.n_tokens = n
        self.seed = state.seed

    def set_cache(self, cache: Optional["LlamaRAMCache"]) -> None:
        """llama-cpp-python's prompt cache switch: LlamaRAMCache(capacity_bytes) keeps KV states of other prompts
        in RAM, LlamaDiskCache(cache_dir, capacity_bytes) on disk too; None turns it off."""
        cfg = self._cache_settings
        cfg["prompt_cache_mb"] = 0 if cache is None else max(1, int(cache.capacity_bytes) >> 20)
        cfg["prompt_cache_dir"] = getattr(cache, "cache_dir", None)
        engine = self.__dict__.pop("_engine", None)
        if engine is not None:
            engine.close()

    # ---- high-level API (generation; one loop: airobackend.engine.Engine) ----

    @property
    def engine(self) -> Engine:
        """The Engine behind create_completion / create_chat_completion (created on first use)."""
        engine = self.__dict__.get("_engine")
        if engine is None:
            # A library caller's threads wait their turn rather than being turned away.
            settings = Settings(n_ctx=self.model.n_ctx, n_batch=self.n_batch, seed=-1, multiuser=1 << 16,
                                template=getattr(self, "chat_format", None), **self._cache_settings)
            engine = self._engine = Engine(self, settings)
        return engine

    def _next_seed(self, seed: Optional[int]) -> Optional[int]:
        """llama-cpp-python: seed=None continues the generator seeded by Llama(seed=...); -1 or none = random."""
        if seed is not None and seed >= 0:
            return int(seed)
        if seed is None and self.seed is not None and self.seed >= 0:
            rng = self.__dict__.get("_seed_rng")
            if rng is None:
                rng = self._seed_rng = random.Random(self.seed)
            return rng.randrange(1 << 31)
        return None

    def create_completion(self, prompt: str | Sequence[int], suffix: Optional[str] = None, max_tokens: Optional[int] = 16,
                          temperature: float = 0.8, top_p: float = 0.95, min_p: float = 0.05,
                          typical_p: float = 1.0, logprobs: Optional[int] = None, echo: bool = False,
                          stop: Optional[str | list[str]] = None, frequency_penalty: float = 0.0,
                          presence_penalty: float = 0.0, repeat_penalty: float = 1.1, top_k: int = 40,
                          stream: bool = False, seed: Optional[int] = None, tfs_z: float = 1.0,
                          mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                          model: Optional[str] = None, stopping_criteria: Any = None, logits_processor: Any = None,
                          grammar: Any = None, logit_bias: Optional[dict] = None, **samplers: Any) -> Any:
        """Complete `prompt` (text or token ids), like llama-cpp-python: an OpenAI-shaped "text_completion" dict,
        or with stream=True an iterator of chunk dicts. max_tokens None or <= 0 = until EOS or the context is full.

        `samplers`: the llama.cpp samplers llama-cpp-python has no argument for, under llama.cpp's names and
        defaults: dry_multiplier (0 = off), dry_base (1.75), dry_allowed_length (2), dry_penalty_last_n (-1 = the
        whole context, 0 = DRY off), dry_sequence_breakers (["\\n", ":", "\\"", "*"]), xtc_probability (0 = off),
        xtc_threshold (0.1), top_n_sigma (-1 = off), and KoboldCpp's smoothing_factor (0 = off), smoothing_curve
        (1), banned_strings (KoboldCpp phrase bans).

        Raises RequestError (a ValueError) for bad arguments and ContextOverflowError when the prompt plus
        max_tokens does not fit in n_ctx (llama-cpp-python's "Requested tokens exceed context window").
        """
        if suffix is not None:
            raise RequestError("suffix (infill) is not supported")
        if stopping_criteria is not None or logits_processor is not None:
            raise RequestError("stopping_criteria / logits_processor callbacks are not supported")
        params = _sampling(temperature=temperature, top_p=top_p, min_p=min_p, typical_p=typical_p, top_k=top_k,
                           repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                           presence_penalty=presence_penalty, tfs_z=tfs_z, mirostat_mode=mirostat_mode,
                           mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, grammar=grammar,
                           logit_bias=logit_bias, seed=self._next_seed(seed), **samplers)
        req = _request(prompt, max_tokens, _stops(stop), params, echo=echo, n_probs=int(logprobs or 0))
        events = self.engine.generate(req)
        cid, created, name = "cmpl-" + uuid.uuid4().hex, int(time.time()), model or self.model_path
        env = Envelope(cid, "text_completion", created, name)
        if stream:
            return _chunks(events, env, CompletionDeltas())
        text, last, lps = _collect(events)
        lp = completion_logprobs(lps, len(req.prompt or "") if echo else 0) if logprobs else None
        return env.answer([completion_choice(0, text, lp, finish_reason(last))], usage(last))

    def __call__(self, prompt: str | Sequence[int], *args: Any, **kwargs: Any) -> Any:
        """Same as create_completion."""
        return self.create_completion(prompt, *args, **kwargs)

    def create_chat_completion(self, messages: list[dict], functions: Any = None, function_call: Any = None,
                               tools: Any = None, tool_choice: Any = None, temperature: float = 0.2,
                               top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05, typical_p: float = 1.0,
                               stream: bool = False, stop: Optional[str | list[str]] = None,
                               seed: Optional[int] = None, response_format: Any = None,
                               max_tokens: Optional[int] = None, presence_penalty: float = 0.0,
                               frequency_penalty: float = 0.0, repeat_penalty: float = 1.1, tfs_z: float = 1.0,
                               mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                               model: Optional[str] = None, logits_processor: Any = None, grammar: Any = None,
                               logit_bias: Optional[dict] = None, logprobs: Optional[bool] = None,
                               top_logprobs: Optional[int] = None, parallel_tool_calls: Optional[bool] = None,
                               **samplers: Any) -> Any:
        """Answer a chat with the model's prompt template (Airoboros by default; `Llama(chat_format=...)` picks
        another): a "chat.completion" dict, or with stream=True an iterator of "chat.completion.chunk" dicts.
        `samplers`: as for create_completion (DRY, XTC, top-nσ, smoothing, banned_strings).

        `response_format` ({"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}})
        makes the answer JSON valid against the schema; `tools`/`tool_choice` (or the older `functions`/
        `function_call`) make the model answer with a tool call or a reply, as llama.cpp's server does for
        templates without a tool syntax (airobackend.tools); calls come back as `tool_calls`."""
        if logits_processor is not None:
            raise RequestError("logits_processor callbacks are not supported")
        if functions is not None or function_call is not None:      # the older spelling of tools / tool_choice
            if tools is not None or tool_choice is not None:
                raise RequestError("give tools / tool_choice or functions / function_call, not both")
            if functions is not None and not isinstance(functions, list):
                raise RequestError("functions must be a list of function definitions")
            tools = [{"type": "function", "function": fn} for fn in functions or []]
            tool_choice = ({"type": "function", "function": {"name": function_call.get("name")}}
                           if isinstance(function_call, dict) else function_call)
        spec = parse_tools(tools, tool_choice, parallel_tool_calls)
        schema = response_format_schema(response_format)
        template = self.engine.template
        structured = None
        if spec is not None and spec.active:
            structured = spec.grammar(schema)
            messages = spec.prepare(messages, getattr(template, "system", ""))
        elif schema is not None:
            structured = schema_to_grammar(schema, param="response_format")
        if structured and grammar is not None:
            raise RequestError("grammar cannot be combined with response_format or tools")
        params = _sampling(temperature=temperature, top_p=top_p, min_p=min_p, typical_p=typical_p, top_k=top_k,
                           repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                           presence_penalty=presence_penalty, tfs_z=tfs_z, mirostat_mode=mirostat_mode,
                           mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, grammar=structured or grammar,
                           logit_bias=logit_bias, seed=self._next_seed(seed), **samplers)
        n_probs = max(1, int(top_logprobs or 0)) if logprobs else 0
        prompt = template.format(messages, tools=spec.tools) if spec is not None else template.format(messages)
        # under a grammar the answer is bounded by it; a template stop string could only cut its JSON short
        stops = _stops(stop) if structured else stop_strings(template, _stops(stop))
        req = _request(prompt, max_tokens, stops, params, n_probs=n_probs)
        events = self.engine.generate(req)
        cid, created, name = "chatcmpl-" + uuid.uuid4().hex, int(time.time()), model or self.model_path
        calls_spec = spec if spec is not None and spec.active else None
        top = int(top_logprobs or 0)
        if stream:
            # llama-cpp-python's first delta is the role alone; the template leaves a space before the reply
            deltas = ChatDeltas(0, calls_spec, top, role_delta={"role": "assistant"}, lstrip=calls_spec is None)
            return _chunks(events, Envelope(cid, "chat.completion.chunk", created, name), deltas)
        text, last, lps = _collect(events)
        message, called = answer_message(text if calls_spec is not None else text.lstrip(), calls_spec)
        choice = chat_choice(0, message, chat_logprobs(lps, top) if logprobs else None,
                             "tool_calls" if called else finish_reason(last))
        return Envelope(cid, "chat.completion", created, name).answer([choice], usage(last))

    def embed(self, input: str | list, normalize: bool = False, truncate: bool = True,
              return_count: bool = False) -> Any:
        """Embeddings as llama-cpp-python's `embed`: a list of floats for a string, a list of them for a list of
        strings (or token-id lists), with `return_count` also the number of tokens. The vector is the mean of the
        final hidden states over the input's tokens (llama.cpp's --pooling mean), divided by its Euclidean norm
        when `normalize`; inputs are cut to n_batch tokens when `truncate`, else refused past it. The context
        (`n_tokens`, the KV cache) is not touched."""
        seqs = token_inputs(input, lambda s: self.tokenize(s.encode("utf-8")), self.model.n_vocab,
                            max_tokens=self.n_batch, truncate=truncate, param="input")
        vectors = [v.tolist() for v in self.engine.embed(seqs, normalize=normalize)]
        out = vectors[0] if isinstance(input, str) else vectors
        return (out, sum(len(s) for s in seqs)) if return_count else out

    def create_embedding(self, input: str | list, model: Optional[str] = None) -> dict:
        """OpenAI's embeddings answer for `input` (a string or a list), as llama-cpp-python's `create_embedding`,
        with the vectors normalised as llama.cpp's server and OpenAI give them."""
        return embeddings_response(self.engine, {"input": input}, model or self.model_path, truncate_default=True)

    def close(self) -> None:
        """Release the model file (its mmap), after the engine kept its KV states (prompt_cache_dir), and the stages
        on other machines, if any. The object is unusable afterwards."""
        engine = self.__dict__.pop("_engine", None)
        if engine is not None:
            engine.close()
        stages = getattr(getattr(self, "model", None), "close", None)
        if stages is not None:
            stages()
        mf = getattr(self, "model_file", None)
        if mf is not None:
            mf.close()
        close = getattr(getattr(self, "draft_model", None), "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Llama":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---- helpers of the high-level API: llama-cpp-python arguments in, OpenAI-shaped dicts out ----

def _stops(stop: Optional[str | list[str]]) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if not all(isinstance(s, str) for s in stop):
        raise RequestError("stop must be a string or a list of strings")
    return tuple(s for s in stop if s)


# llama.cpp's common_params_sampling defaults for the samplers llama-cpp-python has no argument for
_EXTRA_SAMPLERS = dict(dry_multiplier=0.0, dry_base=1.75, dry_allowed_length=2, dry_penalty_last_n=-1,
                       dry_sequence_breakers=("\n", ":", "\"", "*"), xtc_probability=0.0, xtc_threshold=0.1,
                       top_n_sigma=-1.0, smoothing_factor=0.0, smoothing_curve=1.0, banned_strings=())


def _sampling(*, temperature: float, top_p: float, min_p: float, typical_p: float, top_k: int,
              repeat_penalty: float, frequency_penalty: float, presence_penalty: float, tfs_z: float,
              mirostat_mode: int, mirostat_tau: float, mirostat_eta: float, grammar: Any,
              logit_bias: Optional[dict], seed: Optional[int], **samplers: Any) -> SamplingParams:
    unknown = set(samplers) - set(_EXTRA_SAMPLERS)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    x = dict(_EXTRA_SAMPLERS, **samplers)
    if grammar is not None and not isinstance(grammar, str):
        # llama-cpp-python's LlamaGrammar keeps its source text; accept any object that does.
        grammar = getattr(grammar, "_grammar_str", None) or getattr(grammar, "grammar", None) or str(grammar)
    try:
        bias = {int(k): float(v) for k, v in (logit_bias or {}).items()}
    except (TypeError, ValueError):
        raise RequestError("logit_bias must map token ids to numbers") from None
    for name in ("dry_sequence_breakers", "banned_strings"):
        v = x[name]
        x[name] = (v,) if isinstance(v, str) else tuple(v) if isinstance(v, (list, tuple)) else v
    last_n = x["dry_penalty_last_n"]
    return SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p, tfs=tfs_z,
        top_a=0.0, repetition_penalty=repeat_penalty, repetition_penalty_range=64,   # llama.cpp's repeat_last_n
        repetition_penalty_slope=1.0,                                                 # uniform over the window
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
        mirostat=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, seed=seed,
        logit_bias=bias, grammar=grammar or None,
        # llama.cpp: dry_penalty_last_n 0 turns DRY off and -1 is the whole context (KoboldCpp reads 0 as the whole)
        dry_multiplier=0.0 if last_n == 0 else x["dry_multiplier"], dry_base=x["dry_base"],
        dry_allowed_length=x["dry_allowed_length"], dry_penalty_last_n=last_n,
        dry_sequence_breakers=x["dry_sequence_breakers"], xtc_probability=x["xtc_probability"],
        xtc_threshold=x["xtc_threshold"], nsigma=x["top_n_sigma"], smoothing_factor=x["smoothing_factor"],
        smoothing_curve=x["smoothing_curve"], banned_strings=x["banned_strings"])


def _request(prompt: Any, max_tokens: Optional[int], stop: tuple[str, ...], params: Any, *, echo: bool = False,
             n_probs: int = 0) -> GenerationRequest:
    if max_tokens is None or (isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens <= 0):
        max_tokens = -1                      # llama-cpp-python: until EOS or the context is full
    common = dict(max_tokens=max_tokens, stop=stop, trim_stop=True, sampling=params, echo=echo, n_probs=n_probs,
                  allow_context_shift=False)
    if isinstance(prompt, bytes):
        prompt = prompt.decode("utf-8")
    if isinstance(prompt, str):
        return GenerationRequest(prompt=prompt, **common)
    if isinstance(prompt, (list, tuple, np.ndarray)):
        return GenerationRequest(tokens=[int(t) for t in prompt], **common)
    raise RequestError("prompt must be a string or a list of token ids")


def _collect(events: Any) -> tuple[str, Any, list]:
    parts, lps, last = [], [], None
    for ev in events:
        parts.append(ev.text)
        if ev.logprobs:
            lps.extend(ev.logprobs)
        last = ev
    return "".join(parts), last, lps


@dataclasses.dataclass
class LlamaState:
    """A saved context, with llama-cpp-python's fields (Llama.save_state / load_state)."""

    input_ids: np.ndarray
    scores: np.ndarray
    n_tokens: int
    llama_state: bytes
    llama_state_size: int
    seed: int


@dataclasses.dataclass
class LlamaRAMCache:
    """llama-cpp-python's RAM prompt cache, for Llama.set_cache: KV states of other prompts kept in RAM."""

    capacity_bytes: int = 2 << 30


@dataclasses.dataclass
class LlamaDiskCache:
    """llama-cpp-python's disk prompt cache, for Llama.set_cache: the RAM cache plus states kept in cache_dir."""

    cache_dir: str = ".cache/llama_cache"
    capacity_bytes: int = 2 << 30


def _chunks(events: Any, env: Envelope, deltas: CompletionDeltas | ChatDeltas) -> Iterator[dict]:
    """The chunk dicts of a stream (airobackend.openai_shapes builds them); closing it ends the generation."""
    try:
        first = deltas.first()
        if first is not None:
            yield env.chunk(first)
        for ev in events:
            for choice in deltas.feed(ev):
                yield env.chunk(choice)
    finally:
        events.close()
