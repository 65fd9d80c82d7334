"""`airobackend inspect FILE`: what a model file holds (format, mix, hparams, tensor types) and the RAM it needs."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import ModelFileError, RequestError
from ..formats import estimate_ram, kv_cache_bytes, open_model
from ..rope import choose_rope
from ..settings import KV_CACHE_TYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="GGUF / GGML (.bin) model file, or a stored .zip (+ .z01) holding one")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the human summary")
    parser.add_argument("--n-ctx", "--ctx-size", "--contextsize", dest="n_ctx", type=int, default=None,
                        help="context length for the RAM estimate (default: the model's training context)")
    parser.add_argument("--gqa", type=int, default=None, dest="n_gqa",
                        help="grouped-query factor for GGML v3 files (LLaMA-2 70B: 8; default inferred)")
    parser.add_argument("-ctk", "--cache-type-k", dest="cache_type_k", choices=KV_CACHE_TYPES,
                        metavar="TYPE", help="KV cache type of the keys for the RAM estimate: f16 (default), q8_0, "
                        "q4_0")
    parser.add_argument("-ctv", "--cache-type-v", dest="cache_type_v", choices=KV_CACHE_TYPES,
                        metavar="TYPE", help="KV cache type of the values, as --cache-type-k")
    parser.add_argument("--quantkv", type=int, choices=(0, 1, 2), metavar="N",
                        help="KoboldCpp's spelling: 0 = f16, 1 = q8_0, 2 = q4_0 for keys and values "
                        "(--cache-type-k/-v win where given)")
    parser.add_argument("--tensors", action="store_true", help="also list every tensor (name, type, shape)")
    parser.add_argument("--stages", type=int, default=None, metavar="N",
                        help="the RAM each of N pipeline stages needs (serve --ray ADDRESS --stages N), and the head")
    parser.add_argument("--rope-freq-base", type=float, default=None, help="RoPE base override (as serve takes it)")
    parser.add_argument("--rope-freq-scale", type=float, default=None, help="RoPE scale override (as serve takes it)")


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def describe(mf, n_ctx=None, with_tensors: bool = False, type_k: str = "f16", type_v: str = "f16",
             user_base=None, user_scale=None) -> dict:
    """The JSON-able summary `inspect --json` prints (also used by the model library); the KV cache and RAM figures
    are for a cache of type_k / type_v. `rope`: the RoPE values the model would run with at n_ctx (automatic
    scaling beyond the trained context unless the user gives values)."""
    hp = mf.hparams
    n_ctx = int(n_ctx or hp.n_ctx_train or 2048)
    out = {
        "path": mf.path, "format": mf.format, "version": mf.version, "version_name": mf.version_name,
        "container": mf.container, "member": mf.member, "file_size": mf.file_size, "ftype": mf.ftype,
        "mix": mf.mix_name,
        "hparams": {k: getattr(hp, k) for k in ("n_vocab", "n_embd", "n_head", "n_head_kv", "n_layer", "n_ff",
                                                 "n_rot", "n_ctx_train", "rms_norm_eps", "rope_freq_base",
                                                 "rope_freq_scale", "bos_id", "eos_id", "unk_id", "add_bos")}
        | {"n_gqa": hp.n_gqa},
        "vocab": {"n": len(mf.vocab), "spelling": mf.vocab.spelling,
                  "model": getattr(mf.vocab, "model", "llama"), "pre": getattr(mf.vocab, "pre", None)},
        "n_tensors": len(mf.tensors), "tensor_types": mf.type_counts(),
        "n_params": sum(t.n_elements for t in mf.tensors.values()),
        "converted_tensors": sum(1 for t in mf.tensors.values() if t.converted_from),
        "n_ctx": n_ctx, "cache_type_k": type_k, "cache_type_v": type_v,
        "kv_cache_bytes": kv_cache_bytes(hp, n_ctx, type_k, type_v),
        "ram_bytes": estimate_ram(mf, n_ctx, type_k=type_k, type_v=type_v),
        "rope": choose_rope(mf, n_ctx, user_base, user_scale).to_dict(),
    }
    if with_tensors:
        out["tensors"] = [{"name": t.name, "legacy_name": t.legacy_name, "type": t.type.name, "ne": list(t.ne),
                           "offset": t.offset, "nbytes": t.nbytes} for t in mf.tensors.values()]
    return out


def stages_ram(mf, n_stages: int, n_ctx: int, type_k: str, type_v: str) -> list[dict]:
    """The head (embeddings, output, logits: stage 0) and each of n_stages pipeline stages: layers and bytes of RAM."""
    from ..pipeline import head_ram, split_layers, stage_ram     # Numba comes with it: only for --stages

    out = [{"stage": 0, "layers": None, "ram_bytes": head_ram(mf, n_ctx=n_ctx)}]
    for i, (lo, hi) in enumerate(split_layers(mf.hparams.n_layer, n_stages)):
        out.append({"stage": i + 1, "layers": [lo, hi - 1],
                    "ram_bytes": stage_ram(mf, lo, hi, n_ctx=n_ctx, type_k=type_k, type_v=type_v)})
    return out


def main(args: argparse.Namespace) -> int:
    try:
        mf = open_model(args.file, n_gqa=args.n_gqa, rope_freq_base=args.rope_freq_base,
                        rope_freq_scale=args.rope_freq_scale)
    except ModelFileError as e:
        print(f"airobackend inspect: error: {e}", file=sys.stderr)
        return 1
    with mf:
        quant = KV_CACHE_TYPES[args.quantkv] if args.quantkv else None
        d = describe(mf, args.n_ctx, args.tensors, args.cache_type_k or quant or "f16",
                     args.cache_type_v or quant or "f16", args.rope_freq_base, args.rope_freq_scale)
        if args.stages:
            try:
                d["stages"] = stages_ram(mf, args.stages, d["n_ctx"], d["cache_type_k"], d["cache_type_v"])
            except RequestError as e:
                print(f"airobackend inspect: error: {e}", file=sys.stderr)
                return 1
    if args.json:
        print(json.dumps(d, indent=1))
        return 0
    hp = d["hparams"]
    where = f" (inside {d['container']}: {d['member']})" if d["container"] == "zip" else ""
    lines = [
        f"file      {d['path']}{where}",
        f"format    {d['version_name']}    mix {d['mix']}" + (f" (ftype {d['ftype']})" if d["ftype"] is not None
                                                              else ""),
        f"size      {_gib(d['file_size'])} ({d['file_size']} bytes), {_params(d['n_params'])} parameters",
        f"model     n_vocab {hp['n_vocab']}  n_embd {hp['n_embd']}  n_layer {hp['n_layer']}  n_head {hp['n_head']}"
        f"  n_head_kv {hp['n_head_kv']} (gqa {hp['n_gqa']})  n_ff {hp['n_ff']}  n_rot {hp['n_rot']}",
        f"runtime   n_ctx_train {hp['n_ctx_train']}  rms_norm_eps {hp['rms_norm_eps']:g}  rope base "
        f"{hp['rope_freq_base']:g} scale {hp['rope_freq_scale']:g}"
        + ("   (not stored in GGML files: defaults or overrides)" if mf.format != "gguf" else ""),
        f"context   n_ctx {d['n_ctx']}: RoPE base {d['rope']['rope_freq_base']:g} scale "
        f"{d['rope']['rope_freq_scale']:g}"
        + {"auto": f"   (automatic: beyond the trained {d['rope']['n_ctx_train']}, KoboldCpp's NTK-aware base)",
           "user": "   (given)"}.get(d["rope"]["source"], ""),
        f"vocab     {d['vocab']['n']} tokens, "
        + (f"byte-level BPE (pre-tokenizer {d['vocab']['pre'] or 'default'})" if d["vocab"]["model"] == "gpt2"
           else f"SentencePiece ({d['vocab']['spelling']} spelling)")
        + f", bos {hp['bos_id']} eos {hp['eos_id']} unk {hp['unk_id']} add_bos {hp['add_bos']}",
        "tensors   " + ", ".join(f"{n} {k}" for k, n in d["tensor_types"].items()) + f"  ({d['n_tensors']} total)",
    ]
    if d["converted_tensors"]:
        lines.append(f"note      {d['converted_tensors']} tensors use a pre-v3 block layout and are converted to "
                     f"the v3 layout in memory when loaded")
    lines.append(f"RAM       {_gib(d['ram_bytes'])} needed at n_ctx {d['n_ctx']} (file {_gib(d['file_size'])} + "
                 f"KV cache {_gib(d['kv_cache_bytes'])} {d['cache_type_k']}/{d['cache_type_v']} + scratch)")
    for st in d.get("stages", ()):
        where = "head" if st["stage"] == 0 else f"stage {st['stage']} (layers {st['layers'][0]}-{st['layers'][1]})"
        lines.append(f"  {where:<24} {_gib(st['ram_bytes'])} RAM on its node")
    if args.tensors:
        for t in d["tensors"]:
            lines.append(f"  {t['name']:<28} {t['type']:<5} {str(t['ne']):<16} @{t['offset']}")
    print("\n".join(lines))
    return 0
