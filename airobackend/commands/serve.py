"""`airobackend serve`: load a model and serve the KoboldAI/KoboldCpp, text-generation-webui and OpenAI APIs.

KoboldCpp's command line works unchanged: `airobackend model.gguf 5001 --contextsize 4096 --password KEY`.
Every flag can also come from an environment variable AIRO_<SETTING> (e.g. AIRO_PORT, AIRO_API_KEY); a flag on the
command line wins over the environment.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any, Callable, Optional

from airobackend import server
from airobackend.demo import BANNER, demo_model_path
from airobackend.errors import AiroError
from airobackend.manager import ConsoleProgress, LineProgress, ModelManager
from airobackend.paths import use_cache_root
from airobackend.plugins import describe_plugins, get_plugin_manager
from airobackend.settings import KV_CACHE_TYPES, Settings

log = logging.getLogger("airobackend.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `serve` (KoboldCpp's spellings, llama.cpp's short forms), plus those the adapter plugins add."""
    d = Settings()
    parser.add_argument("model_pos", nargs="?", metavar="MODEL", help="model file (as koboldcpp takes it)")
    parser.add_argument("port_pos", nargs="?", type=int, metavar="PORT", help="port (as koboldcpp takes it)")
    m = parser.add_argument_group("model")
    m.add_argument("-m", "--model", help="GGUF/GGML model file, or a model name in --model-dir "
                   "(default: the demo model, random weights; env AIRO_MODEL)")
    m.add_argument("--model-dir", help=f"folder of loadable models (default {d.model_dir}; env AIRO_MODEL_DIR)")
    m.add_argument("-c", "--contextsize", "--ctx-size", dest="n_ctx", type=int, metavar="N",
                   help=f"context size in tokens (default {d.n_ctx}; env AIRO_N_CTX)")
    m.add_argument("-t", "--threads", dest="n_threads", type=int, metavar="N",
                   help="CPU threads (default: physical cores; env AIRO_N_THREADS)")
    m.add_argument("--template", help="chat prompt template: airoboros, vicuna, alpaca, chatml "
                   "(default: from the file; env AIRO_TEMPLATE)")
    # GGML v3 files cannot store these; llama.cpp's defaults apply unless given (`examples/common.cpp` at dadbed9).
    m.add_argument("--n-gqa", "--gqa", dest="n_gqa", type=int, metavar="N",
                   help="grouped-query attention factor (default: from the tensor shapes; env AIRO_N_GQA)")
    m.add_argument("--rms-norm-eps", "--eps", dest="rms_norm_eps", type=float, metavar="EPS",
                   help="RMSNorm epsilon (default: the file's, else 5e-6; env AIRO_RMS_NORM_EPS)")
    m.add_argument("--rope-freq-base", dest="rope_freq_base", type=float, metavar="BASE",
                   help="RoPE frequency base (default: the file's, else 10000; env AIRO_ROPE_FREQ_BASE)")
    m.add_argument("--rope-freq-scale", dest="rope_freq_scale", type=float, metavar="SCALE",
                   help="RoPE linear position scale, 0.25 for SuperHOT-8K (default 1; env AIRO_ROPE_FREQ_SCALE)")
    m.add_argument("--ropeconfig", nargs=2, type=float, metavar=("SCALE", "BASE"),
                   help="KoboldCpp's spelling of --rope-freq-scale SCALE --rope-freq-base BASE")
    m.add_argument("-ctk", "--cache-type-k", dest="cache_type_k", choices=KV_CACHE_TYPES, metavar="TYPE",
                   help="KV cache type for keys: f16, q8_0 (half the memory) or q4_0 (default f16; env "
                        "AIRO_CACHE_TYPE_K)")
    m.add_argument("-ctv", "--cache-type-v", dest="cache_type_v", choices=KV_CACHE_TYPES, metavar="TYPE",
                   help="KV cache type for values, as --cache-type-k (env AIRO_CACHE_TYPE_V)")
    m.add_argument("--quantkv", type=int, choices=(0, 1, 2), metavar="N",
                   help="KoboldCpp's spelling: 0 = f16, 1 = q8_0, 2 = q4_0 for keys and values (--cache-type-k/-v "
                        "win where given). Unlike KoboldCpp it needs no --flashattention and keeps context shifting")
    m.add_argument("--flashattention", "--flash-attn", "-fa", action="store_true",
                   help="accepted for KoboldCpp / llama.cpp command lines; changes nothing here (a quantized cache "
                        "is always read by flash-attention kernels, an f16 one as llama.cpp's default)")
    c = parser.add_argument_group("long chats (KV cache reuse, saved states)")
    c.add_argument("--cache-reuse", dest="cache_reuse", type=int, metavar="N",
                   help=f"reuse runs of at least N cached tokens that a trimmed prompt has at other positions, moving "
                        f"them (llama.cpp's flag; 0 = only an exact prefix; default {d.cache_reuse}; "
                        f"env AIRO_CACHE_REUSE)")
    c.add_argument("--noshift", dest="noshift", action="store_true", default=None,
                   help="KoboldCpp's flag: no context shift of trimmed prompts, reuse only an exact prefix "
                        "(env AIRO_CONTEXT_SHIFT=0)")
    c.add_argument("--cache-slots", dest="cache_slots", type=int, metavar="K",
                   help=f"KV states of other conversations kept in RAM (default {d.cache_slots}; env AIRO_CACHE_SLOTS)")
    c.add_argument("--prompt-cache-mb", dest="prompt_cache_mb", type=int, metavar="MB",
                   help="RAM for those states, counted by the RAM check at load (default: what is free after the "
                        "model, up to K full contexts; 0 = none; env AIRO_PROMPT_CACHE_MB)")
    c.add_argument("--prompt-cache-dir", "--slot-save-path", dest="prompt_cache_dir", metavar="DIR",
                   help="keep KV states on disk: they survive restarts and model switches; also where llama.cpp's "
                        "POST /slots/{id}?action=save|restore read and write (env AIRO_PROMPT_CACHE_DIR)")
    m.add_argument("--draftmodel", "--draft-model", "--model-draft", "-md", dest="draft_model", metavar="FILE",
                   help="speculative decoding with this smaller model of the same vocabulary as the draft "
                        "(one slot only: ignored with --parallel above 1; env AIRO_DRAFT_MODEL)")
    m.add_argument("--draftamount", "--draft", "--draft-max", dest="draft", type=int, metavar="N",
                   help=f"the most tokens drafted at a time (default {d.draft}; env AIRO_DRAFT)")
    m.add_argument("--draft-p-min", dest="draft_p_min", type=float, metavar="P",
                   help=f"the draft model stops after a token it gives less than this probability "
                        f"(default {d.draft_p_min}; env AIRO_DRAFT_P_MIN)")
    m.add_argument("--lookup-ngram", dest="lookup_ngram", type=int, metavar="N",
                   help="speculative decoding without a draft model: copy what followed the last N tokens earlier "
                        "in the context (default 0 = off; ignored with --parallel above 1; env AIRO_LOOKUP_NGRAM)")
    b = parser.add_argument_group("many users at once")
    b.add_argument("-np", "--parallel", dest="parallel", type=int, metavar="N",
                   help=f"generation slots (llama.cpp's flag): up to N requests generate together, sharing each "
                        f"forward pass, each with its own KV cache of --contextsize tokens; the rest wait "
                        f"(--multiuser) (default {d.parallel}; env AIRO_PARALLEL)")
    b.add_argument("--prefill-chunk", dest="prefill_chunk", type=int, metavar="N",
                   help=f"with --parallel: prompt tokens evaluated per step beside the generating slots, so a new "
                        f"prompt delays the others' next token by one chunk at most (default {d.prefill_chunk}; "
                        f"env AIRO_PREFILL_CHUNK)")
    m.add_argument("--allow-disk", action="store_true", default=None,
                   help="load a model larger than free RAM, reading it from disk (slow; env AIRO_ALLOW_DISK)")
    r = parser.add_argument_group("more than one machine (Ray; pip install 'airobackend[ray]')")
    r.add_argument("--ray", metavar="ADDRESS", help="Ray cluster to run on: host:port of `ray start --head`, 'auto', "
                   "or 'local' (this machine alone; env AIRO_RAY)")
    r.add_argument("--stages", type=int, metavar="N", help="split the layers into N pipeline stages, one per node, "
                   "each mapping only its own layers (default 1; env AIRO_STAGES)")
    r.add_argument("--replicas", type=int, metavar="N", help="N whole engines, one per node, behind this server "
                   "(env AIRO_REPLICAS)")
    r.add_argument("--ray-cpus", type=float, metavar="N", help=f"CPUs each stage or replica reserves on its node "
                   f"(default {d.ray_cpus:g}; env AIRO_RAY_CPUS)")
    r.add_argument("--ray-restarts", type=int, metavar="N", help=f"times Ray restarts a stage or replica that died "
                   f"(default {d.ray_restarts}; env AIRO_RAY_RESTARTS)")
    s = parser.add_argument_group("server")
    s.add_argument("--host", help=f"address to listen on (default {d.host}: this machine only; env AIRO_HOST)")
    s.add_argument("--port", type=int, help=f"port (default {d.port}, KoboldCpp's; env AIRO_PORT)")
    s.add_argument("--multiuser", type=int, nargs="?", const=1, metavar="N",
                   help="KoboldCpp's queue: N requests in all, i.e. N-1 may wait while one generates (1 or no N: "
                        "6 may wait, as KoboldCpp); more get 503 busy; 0 answers busy at once "
                        f"(default: {d.multiuser} waiting; env AIRO_MULTIUSER = how many may wait)")
    s.add_argument("--password", "--api-key", dest="api_key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but the version/model probes "
                        "(env AIRO_API_KEY)")
    s.add_argument("--admin-key", metavar="KEY", help="key for loading/unloading models (default: the API key; "
                   "env AIRO_ADMIN_KEY)")
    s.add_argument("--cors", metavar="ORIGIN[,ORIGIN]", help="web page origins allowed to call the API; only "
                   "listed origins may also perform admin actions, with the key (default: any origin may generate, "
                   "like KoboldCpp and llama.cpp; env AIRO_CORS)")
    s.add_argument("--allowed-hosts", metavar="NAME[,NAME]",
                   help="Host names answered besides localhost when listening on loopback, e.g. a reverse proxy's "
                        "name ('*': any; env AIRO_ALLOWED_HOSTS)")
    s.add_argument("--disable-adapter", action="append", metavar="NAME", default=None,
                   help="do not serve this protocol adapter: kobold, textgen, openai or a plugin name "
                        "(repeatable or comma-separated; env AIRO_DISABLE_ADAPTERS)")
    s.add_argument("--max-body-bytes", type=int, metavar="N",
                   help=f"largest request body accepted (default {d.max_body_bytes}; env AIRO_MAX_BODY_BYTES)")
    s.add_argument("--max-connections", type=int, metavar="N",
                   help=f"open connections served at once, more get 503; with the body cap this bounds memory "
                        f"(default {d.max_connections}, 0 = no limit; env AIRO_MAX_CONNECTIONS)")
    s.add_argument("--quiet", action="store_true", default=None, help="log warnings only (env AIRO_QUIET)")
    s.add_argument("--list-plugins", action="store_true", help="print the registered adapter plugins and exit")
    try:
        get_plugin_manager().hook.add_cli_arguments(parser=s)
    except Exception as e:  # a broken third-party plugin must not take the command line down
        print(f"warning: plugin flags unavailable: {e}", file=sys.stderr)


def kobold_waiting_places(multiuser: Optional[int]) -> Optional[int]:
    """KoboldCpp's --multiuser N as the number of requests that may wait (Settings.multiuser): N-1, except that
    1 means 6 ("backwards compatibility for up to 7", KoboldCpp 1.76 `koboldcpp.py`) and 0 means none."""
    if multiuser is None:
        return None
    if multiuser <= 0:
        return 0
    return 6 if multiuser == 1 else multiuser - 1


def settings_from_args(args: argparse.Namespace, environ: Optional[dict] = None) -> Settings:
    """Settings from AIRO_* variables, overridden by the flags given (KoboldCpp positionals included)."""
    disabled = None
    if args.disable_adapter:
        disabled = tuple(n.strip() for item in args.disable_adapter for n in item.split(",") if n.strip())
    overrides: dict[str, Any] = dict(
        model=args.model or args.model_pos, model_dir=args.model_dir, n_ctx=args.n_ctx, n_threads=args.n_threads,
        template=args.template, allow_disk=args.allow_disk, host=args.host, draft_model=args.draft_model,
        draft=args.draft, draft_p_min=args.draft_p_min, lookup_ngram=args.lookup_ngram,
        n_gqa=args.n_gqa, rms_norm_eps=args.rms_norm_eps,
        rope_freq_scale=args.ropeconfig[0] if args.ropeconfig else args.rope_freq_scale,
        rope_freq_base=args.ropeconfig[1] if args.ropeconfig else args.rope_freq_base,
        port=args.port if args.port is not None else args.port_pos, multiuser=kobold_waiting_places(args.multiuser),
        api_key=args.api_key, admin_key=args.admin_key, cors=args.cors, disable_adapters=disabled,
        allowed_hosts=tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip())
        if args.allowed_hosts else None,
        max_body_bytes=args.max_body_bytes, max_connections=args.max_connections, quiet=args.quiet,
        textgen_stream_port=getattr(args, "textgen_stream_port", None), cache_reuse=args.cache_reuse,
        context_shift=False if args.noshift else None, cache_slots=args.cache_slots,
        prompt_cache_mb=args.prompt_cache_mb, prompt_cache_dir=args.prompt_cache_dir,
        ray=getattr(args, "ray", None), stages=getattr(args, "stages", None), replicas=getattr(args, "replicas", None),
        ray_cpus=getattr(args, "ray_cpus", None), ray_restarts=getattr(args, "ray_restarts", None),
        parallel=args.parallel, prefill_chunk=args.prefill_chunk)
    quant = KV_CACHE_TYPES[args.quantkv] if getattr(args, "quantkv", None) else None
    overrides["cache_type_k"] = getattr(args, "cache_type_k", None) or quant
    overrides["cache_type_v"] = getattr(args, "cache_type_v", None) or quant
    settings = Settings.from_env(environ, **overrides)
    check_cluster_settings(settings)
    return settings


def check_cluster_settings(settings: Settings) -> None:
    """ValueError for Ray settings that cannot work together (before anything is started)."""
    if settings.stages < 1 or settings.replicas < 0:
        raise ValueError(f"--stages must be at least 1 and --replicas at least 0 (got {settings.stages}, "
                         f"{settings.replicas})")
    if (settings.stages > 1 or settings.replicas) and not settings.ray:
        raise ValueError("--stages and --replicas need a Ray cluster: --ray host:port (or --ray local)")
    if settings.stages > 1 and settings.replicas:
        raise ValueError("--stages and --replicas cannot be combined yet: give one of them")


def security_warnings(settings: Settings) -> list[str]:
    """What to warn about before listening (shown on stderr): beyond loopback, what anyone who reaches the port
    may do."""
    if server.is_loopback(settings.host):
        return []
    if settings.api_key:
        return []
    # The admin actions this server offers: slot save/restore writes and reads files, and exists only with a folder.
    actions = "loading, unloading and switching models"
    if settings.prompt_cache_dir:
        actions += f", saving and restoring slots (files in {settings.prompt_cache_dir})"
    if settings.admin_key:
        admin = f"admin actions ({actions}) need the admin key"
    else:
        admin = f"so are the admin actions: {actions} (set --admin-key KEY to keep those)"
    return [f"listening on {settings.host} without an API key: anyone who can reach this port can generate with "
            f"the model (KoboldCpp, text-generation-webui and OpenAI routes, WebSockets included); {admin}. "
            f"Set --api-key KEY (env AIRO_API_KEY) or listen on 127.0.0.1."]


def banner(settings: Settings, listeners: list, plugin_names: set, info: dict, demo: bool) -> str:
    """The 'ready' message: model, then one URL per protocol served."""
    def url(host: str, port: int, scheme: str = "http") -> str:
        shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
        shown = f"[{shown}]" if ":" in shown else shown
        return f"{scheme}://{shown}:{port}"

    host, port = listeners[0]
    base = url(host, port)
    kv = f", KV cache {info['kv_cache']}" if info.get("kv_cache", "f16/f16") != "f16/f16" else ""
    lines = [f"airobackend ready: model {info.get('name')} ({info.get('mix') or '?'}, context {info.get('n_ctx')}"
             f"{kv}, template {info.get('template')})"]
    if demo:
        lines.append("  NOTE: " + BANNER)
    if "kobold" in plugin_names:
        lines.append(f"  KoboldAI / KoboldCpp API   {base}/api      (KoboldAI Lite, SillyTavern 'KoboldAI Classic')")
    if "openai" in plugin_names:
        lines.append(f"  OpenAI-compatible API      {base}/v1       (openai SDK, SillyTavern 'Text Completion')")
    if "textgen" in plugin_names:
        ws = [url(h, p, "ws") for h, p in listeners[1:]] or [url(host, port, "ws")]
        lines.append(f"  text-generation-webui API  {base}/api/v1/generate, {ws[0]}/api/v1/stream")
    if "models" in plugin_names:
        lines.append(f"  model library (admin)      {base}/api/admin/list_options, {base}/v1/internal/model/list")
    if "llamacpp" in plugin_names and settings.prompt_cache_dir:
        lines.append(f"  llama.cpp slots (admin)    {base}/slots/ID?action=save|restore|erase")
    for name in sorted(plugin_names - {"kobold", "openai", "textgen", "models", "llamacpp"}):
        lines.append(f"  plugin {name}")
    lines.append(f"  API documentation          {base}/docs")
    if settings.api_key:
        lines.append("  API key required (Authorization: Bearer KEY)")
    return "\n".join(lines)


def open_engine(settings: Settings) -> tuple[Any, Callable[[], None], bool]:
    """A ModelManager with the requested model (or the demo model) registered but not loaded yet, the function that
    loads it, and whether it is the demo model."""
    quiet = settings.quiet
    progress = None if quiet else (ConsoleProgress() if sys.stderr.isatty() else LineProgress(log.info))
    manager = ModelManager(settings, on_progress=progress)
    demo = settings.model is None
    if demo:
        path = str(demo_model_path(settings.cache_dir))
        name = manager.register(path)
    elif os.path.exists(settings.model):
        name = manager.register(settings.model)
    else:
        name = settings.model                     # a name in --model-dir
    return manager, lambda: manager.load(name), demo


def main(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING if settings.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    pm = get_plugin_manager(blocked=settings.disable_adapters)
    if args.list_plugins:
        print("\n".join(describe_plugins(pm)))
        return 0
    for w in security_warnings(settings):
        log.warning(w)
    use_cache_root(settings.cache_dir)          # before anything compiles
    try:
        engine, load, demo = open_engine(settings)
    except (AiroError, OSError) as e:
        print(f"error: cannot load the model: {e}", file=sys.stderr)
        return 1
    app = server.create_app(engine, settings, pm)
    try:
        server.check_ports(app, settings)               # before a load that may take minutes
    except server.PortInUse as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        load()
    except (AiroError, OSError) as e:
        print(f"error: cannot load the model: {e}", file=sys.stderr)
        pm.hook.shutdown(engine=engine, settings=settings, app=app)
        return 1
    names = {name for name, plugin in pm.list_name_plugin() if plugin is not None}

    def ready(listeners: list) -> None:
        print(banner(settings, listeners, names, engine.model_info(), demo), file=sys.stderr, flush=True)

    try:
        asyncio.run(server.serve_async(app, settings, ready=ready))
    except server.PortInUse as e:                       # taken while the model loaded
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        engine.close()          # saved KV states go to --prompt-cache-dir
    return 0
