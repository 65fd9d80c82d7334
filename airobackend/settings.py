"""One dataclass carries every setting from the CLI / environment to the engine and server. Nothing reads globals."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Optional


KV_CACHE_TYPES = ("f16", "q8_0", "q4_0")      # airobackend.kvcache.CODECS; KoboldCpp's --quantkv 0, 1, 2


@dataclass
class Settings:
    # model
    model: Optional[str] = None            # None -> the bundled demo model
    model_dir: str = "models"
    n_ctx: int = 2048
    n_threads: int = 0                     # 0 -> number of physical cores the process may use
    n_batch: int = 512
    n_gqa: Optional[int] = None            # GGML v3 files cannot store it (LLaMA-2 70B needs 8)
    rms_norm_eps: Optional[float] = None
    rope_freq_base: Optional[float] = None
    rope_freq_scale: Optional[float] = None
    use_mmap: bool = True
    cache_type_k: str = "f16"              # KV cache types (llama.cpp's --cache-type-k/-v): f16, q8_0 or q4_0
    cache_type_v: str = "f16"
    template: Optional[str] = None         # prompt template name; None -> chosen from the file name / metadata
    cache_dir: Optional[str] = None        # the cache root (demo model, kernels, Numba cache); None -> airobackend.paths
    seed: int = -1
    # long chats: reuse of the KV cache (airobackend.promptcache) and saved states (airobackend.kvstate)
    context_shift: bool = True             # KoboldCpp --noshift turns it off: only an exact prefix is reused
    cache_reuse: int = 32                  # llama.cpp --cache-reuse N: reuse moved runs of >= N matching tokens
    cache_slots: int = 4                   # saved KV states of other conversations kept in RAM
    prompt_cache_mb: Optional[int] = None  # RAM for them; None = what is free after loading (up to cache_slots
                                           # full contexts), 0 = none
    prompt_cache_dir: Optional[str] = None # KV states on disk: survive restarts and model switches; slot save/restore
    # speculative decoding (airobackend.speculative)
    draft_model: Optional[str] = None      # a smaller model of the same vocabulary that drafts tokens
    draft: int = 8                         # the most tokens drafted at a time (KoboldCpp's --draftamount default)
    draft_p_min: float = 0.75              # the draft model stops after a token it is less sure of (llama.cpp's)
    lookup_ngram: int = 0                  # > 0 and no draft model: draft by prompt lookup of the last N tokens
    # many users at once (airobackend.slots)
    parallel: int = 1                      # llama.cpp --parallel N: generation slots sharing each forward pass;
                                           # 1 = one generation at a time, the others queue (KoboldCpp's model)
    prefill_chunk: int = 128               # prompt tokens per step beside the decoding slots (parallel > 1)
    # server
    host: str = "127.0.0.1"
    port: int = 5001
    textgen_stream_port: Optional[int] = 5005
    api_key: Optional[str] = None
    admin_key: Optional[str] = None
    cors: Optional[str] = None             # None -> any origin, like KoboldCpp / llama.cpp / text-generation-webui
    allowed_hosts: tuple[str, ...] = ()    # Host names a loopback listener answers besides localhost (DNS rebinding)
    multiuser: int = 6                     # requests that may wait while one generates (KoboldCpp's default)
    max_body_bytes: int = 32 * 1024 * 1024
    max_connections: int = 128            # open connections at once; more get 503 (bounds memory: N x body cap)
    disable_adapters: tuple[str, ...] = ()
    quiet: bool = False
    allow_disk: bool = False               # load a model that does not fit in RAM, running from disk via mmap
    # more than one machine (airobackend.cluster; needs the [ray] extra)
    ray: Optional[str] = None              # Ray cluster address (host:port of `ray start --head`, 'auto', 'local')
    stages: int = 1                        # pipeline stages: the layers split over this many Ray actors (nodes)
    replicas: int = 0                      # whole engines as Ray actors behind this server (0: none, local engine)
    ray_cpus: float = 1.0                  # Ray CPUs each stage or replica reserves (its placement-group bundle)
    ray_restarts: int = 3                  # times Ray restarts a stage or replica that died

    @classmethod
    def from_env(cls, environ: Optional[dict] = None, **overrides) -> "Settings":
        """Settings from `AIRO_<FIELD>` environment variables, then explicit overrides (CLI flags) on top."""
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = env.get("AIRO_" + f.name.upper())
            if raw is None:
                continue
            values[f.name] = _parse(f.type, raw, f.name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _parse(type_name, raw: str, name: str):
    t = str(type_name)
    try:
        if "bool" in t:
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if "tuple" in t:
            return tuple(x.strip() for x in raw.split(",") if x.strip())
        if "int" in t:
            return int(raw)
        if "float" in t:
            return float(raw)
    except ValueError as e:
        raise ValueError(f"environment variable AIRO_{name.upper()}={raw!r}: {e}") from None
    return raw
