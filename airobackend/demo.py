"""The demo model: a tiny LLaMA-architecture GGUF made on first use, so `airobackend run` works with nothing downloaded.

It is a real model file in every respect the engine cares about (GGUF v3, LLaMA tensor names and shapes, Q8_0
weights, a SentencePiece-BPE vocabulary with byte fallback), but its weights are random: **it prints nonsense**.
It exists to try the CLI, the server and the frontends on a fresh machine, and for fast tests.

The vocabulary is trained deterministically by BPE (SentencePiece style: words carry a leading '▁', merges never
cross a word, byte tokens <0x00>..<0xFF> for everything else) on the small English text bundled in
`airobackend/data/demo_corpus.txt`, so English prompts tokenize into sensible pieces. The weights come from
`numpy.random.default_rng([seed, k])` per tensor, as for the llama.cpp fixtures. The file is written once into the
cache root (airobackend.paths: `Settings.cache_dir`, env AIRO_CACHE_DIR; default ~/.cache/airobackend), never into the
repository.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from airobackend.formats import HParams, Vocab
from airobackend.paths import cache_root
from airobackend.quant import GGMLType

log = logging.getLogger("airobackend.demo")

BANNER = ("demo model: a tiny LLaMA with RANDOM weights - it prints nonsense. "
          "Give a real model file with -m / --model to get real answers.")

SP = "\u2581"
# llama_token_type values (GGUF tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6


@dataclass(frozen=True)
class DemoSpec:
    """Everything that determines the demo file; its hash names the file, so a change makes a new one."""

    version: int = 1
    n_vocab_max: int = 2048
    n_embd: int = 256
    n_head: int = 4
    n_layer: int = 2
    n_ff: int = 768
    n_ctx_train: int = 2048
    rms_norm_eps: float = 1e-5
    rope_freq_base: float = 10000.0
    weight_type: str = "q8_0"
    seed: int = 20230721

    def tag(self) -> str:
        # The spec, the corpus and this file's code decide the bytes, so all three name the file.
        h = hashlib.sha256(repr(asdict(self)).encode() + _corpus_text().encode()
                           + Path(__file__).read_bytes()).hexdigest()[:10]
        return f"airobackend-demo-v{self.version}-{h}"


DEFAULT_SPEC = DemoSpec()


def _corpus_text() -> str:
    return (Path(__file__).parent / "data" / "demo_corpus.txt").read_text(encoding="utf-8")


def train_vocab(text: str, n_vocab_max: int) -> tuple[list[bytes], list[float], list[int]]:
    """A SentencePiece-BPE vocabulary learned from `text`: (pieces in GGUF spelling, scores, token types).

    Layout as in LLaMA: 0 <unk>, 1 <s>, 2 </s>, 3..258 byte tokens, then the merged pieces in merge order (score
    -rank, so llama.cpp's highest-score-first merging replays training), then the single characters. Ties between
    equally frequent pairs go to the lexicographically smallest pair, so the result depends on the text alone. Merging
    continues down to pairs seen once (whole corpus words become single pieces) until `n_vocab_max` is reached.
    """
    words = collections.Counter(SP + w for w in text.split())
    seqs = {w: list(w) for w in words}
    chars = sorted({c for w in words for c in w})
    pair_count: collections.Counter = collections.Counter()
    pair_words: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    for w, f in words.items():
        s = seqs[w]
        for p in zip(s, s[1:]):
            pair_count[p] += f
            pair_words[p].add(w)

    n_fixed = 3 + 256
    budget = n_vocab_max - n_fixed - len(chars)
    merges: list[str] = []
    seen: set[str] = set(chars)
    while len(merges) < budget and pair_count:
        best = min(pair_count.items(), key=lambda kv: (-kv[1], kv[0]))
        (a, b), count = best
        new = a + b
        if new not in seen:
            seen.add(new)
            merges.append(new)
        for w in list(pair_words.pop((a, b), ())):
            s, f = seqs[w], words[w]
            for p in zip(s, s[1:]):
                pair_count[p] -= f
                if pair_count[p] <= 0:
                    del pair_count[p]
            merged, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    merged.append(new)
                    i += 2
                else:
                    merged.append(s[i])
                    i += 1
            seqs[w] = merged
            for p in zip(merged, merged[1:]):
                pair_count[p] += f
                pair_words[p].add(w)
        pair_count.pop((a, b), None)

    pieces = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % i for i in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    scores = [0.0] * n_fixed
    for rank, m in enumerate(merges):
        pieces.append(m.encode())
        types.append(NORMAL)
        scores.append(-float(rank))
    for i, c in enumerate(chars):
        pieces.append(c.encode())
        types.append(NORMAL)
        scores.append(-float(len(merges) + i))
    return pieces, scores, types


def _tensors(spec: DemoSpec, n_vocab: int) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in numpy order) for every tensor, in llama.cpp's order."""
    e, ff = spec.n_embd, spec.n_ff
    shapes = [("token_embd.weight", (n_vocab, e))]
    for i in range(spec.n_layer):
        shapes += [(f"blk.{i}.attn_norm.weight", (e,)), (f"blk.{i}.attn_q.weight", (e, e)),
                   (f"blk.{i}.attn_k.weight", (e, e)), (f"blk.{i}.attn_v.weight", (e, e)),
                   (f"blk.{i}.attn_output.weight", (e, e)), (f"blk.{i}.ffn_norm.weight", (e,)),
                   (f"blk.{i}.ffn_gate.weight", (ff, e)), (f"blk.{i}.ffn_down.weight", (e, ff)),
                   (f"blk.{i}.ffn_up.weight", (ff, e))]
    shapes += [("output_norm.weight", (e,)), ("output.weight", (n_vocab, e))]
    out = []
    for k, (name, shape) in enumerate(shapes):
        x = np.random.default_rng([spec.seed, k]).standard_normal(shape, dtype=np.float32)
        if name == "output.weight":
            # Larger output rows make the next-token distribution peaked, so the nonsense is made of whole words;
            # zero rows for <unk>, <s> and the byte tokens keep lone UTF-8 fragments ('\ufffd') out of it.
            x = 0.15 * x
            x[:2] = 0.0
            x[3:3 + 256] = 0.0
            out.append((name, x))
            continue
        out.append((name, (1.0 + 0.02 * x) if len(shape) == 1 else 0.02 * x))
    return out


def write_demo_model(path: Path, spec: DemoSpec = DEFAULT_SPEC) -> None:
    """Write the demo GGUF to `path` (deterministic: the same spec gives the same bytes)."""
    pieces, scores, types = train_vocab(_corpus_text(), spec.n_vocab_max)
    tensors = _tensors(spec, len(pieces))
    _write_gguf(path, spec, pieces, scores, types, tensors)


def _write_gguf(path: Path, spec: DemoSpec, pieces: list[bytes], scores: list[float], types: list[int],
                tensors: list[tuple[str, np.ndarray]]) -> None:
    """Write with the project's GGUF writer and quantizers (airobackend.formats.writer / .quantize)."""
    # here, only when the file is written: the server and the command line import this module for its banner
    from airobackend.formats.quantize import quantize
    from airobackend.formats.writer import MIX_FTYPE, TensorSpec, write_gguf

    weight_type = GGMLType[spec.weight_type.upper()]
    hp = HParams(n_vocab=len(pieces), n_embd=spec.n_embd, n_head=spec.n_head, n_head_kv=spec.n_head,
                 n_layer=spec.n_layer, n_ff=spec.n_ff, n_rot=spec.n_embd // spec.n_head,
                 n_ctx_train=spec.n_ctx_train, rms_norm_eps=spec.rms_norm_eps, rope_freq_base=spec.rope_freq_base)
    vocab = Vocab(pieces=pieces, scores=np.asarray(scores, np.float32), types=np.asarray(types, np.int32),
                  spelling="gguf")
    values = dict(tensors)
    specs = [TensorSpec(name, GGMLType.F32 if x.ndim == 1 else weight_type, tuple(reversed(x.shape)))
             for name, x in tensors]

    def data(t: TensorSpec):
        yield quantize(values[t.name], t.type)

    write_gguf(path, hparams=hp, vocab=vocab, tensors=specs, data=data, ftype=MIX_FTYPE[spec.weight_type],
               name="airobackend demo (random weights)")


def demo_model_path(cache_dir: Optional[str | os.PathLike] = None, spec: DemoSpec = DEFAULT_SPEC) -> Path:
    """Path of the demo model, writing it first if the cache does not have it yet (about a second).

    `cache_dir`: where to keep it; None = the cache root (airobackend.paths: AIRO_CACHE_DIR, else
    ~/.cache/airobackend). Concurrent first uses are safe: each writes a temporary file and renames it into place
    atomically.
    """
    folder = Path(cache_dir) if cache_dir else cache_root()
    path = folder / f"{spec.tag()}.gguf"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    log.info("writing the demo model to %s (%s)", path, BANNER)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write_demo_model(Path(tmp), spec)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def is_demo_model(path: Optional[str | os.PathLike]) -> bool:
    """True for a file written by `demo_model_path` (so banners can say it prints nonsense)."""
    return bool(path) and Path(path).name.startswith("airobackend-demo-")
