"""Byte-level BPE tokenizer (GGUF `tokenizer.ggml.model` = gpt2) exactly as llama.cpp c392e50 runs it
(`llm_tokenizer_bpe_session`, src/llama-vocab.cpp): LLaMA-3, SmolLM, DeepSeek, Mistral Nemo (Tekken), Qwen-style
vocabularies.

Encoding: special tokens are cut out of the text first (user-defined ones always, control ones when asked,
`special=True`; longest first, as `tokenizer_st_partition` does); each remaining fragment is split into words by the
pre-tokenizer of `tokenizer.ggml.pre` (airobackend.pretokenize); each word's UTF-8 bytes are spelled with GPT-2's
byte characters (0x20 -> 'Ġ', ...), and adjacent symbols are merged by merge rank, lowest first, leftmost on ties,
while the pair is in `tokenizer.ggml.merges`. Symbols that are not tokens fall back to the tokens of their single
bytes. BOS / EOS are added when the file says so (`add_bos_token`, `add_eos_token`).

Speed: a word's tokens depend only on the word, so each distinct word is merged once and cached; words longer than
`_NUMBA_MIN` characters go to the compiled merge loop the SentencePiece tokenizer uses for long fragments.
"""
from __future__ import annotations

import bisect
import logging
from itertools import chain
from typing import Any, Optional, Sequence

import numpy as np

from airobackend.errors import ModelFileError, RequestError
from airobackend.pretokenize import (BYTE_CHARS, BYTE_ENCODE, CHAR_BYTE, PRE_TYPES, decode_utf8, pre_tokenizer)
from airobackend.tokenizer import (CONTROL, NORMAL, UNKNOWN, USER_DEFINED, Vocabulary, end_of_generation,
                                   merge_symbols)

log = logging.getLogger("airobackend.bpe")

_CACHE_MAX = 1 << 17
_SPECIAL_HEAD = 4                 # special tokens are looked for in the text only where their first 4 characters are
_NUMBA_MIN = 48                   # longer words are merged by the compiled loop (O(n log n) instead of O(n^2))


class BPETokenizer(Vocabulary):
    """llama.cpp's byte-level BPE tokenizer over one vocabulary (same interface as `tokenizer.Tokenizer`).

    `pieces` are the vocabulary entries as stored (bytes, GPT-2 byte characters for normal tokens), `merges` the
    `tokenizer.ggml.merges` strings ("left right", rank = position), `pre` the `tokenizer.ggml.pre` name.
    """

    kind = "bpe"

    def __init__(self, pieces: Sequence[bytes], types: Optional[Sequence[int]], merges: Sequence[bytes | str],
                 pre: str = "", *, bos_id: int = 11, eos_id: int = 11, unk_id: int = -1,
                 add_bos: Optional[bool] = None, add_eos: bool = False, add_space_prefix: bool = False,
                 special_ids: Optional[dict[str, int]] = None) -> None:
        if pre not in PRE_TYPES:
            raise ModelFileError(f"pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; supported: "
                                 f"{', '.join(sorted(k for k in PRE_TYPES if k))}")
        if not pre:
            log.warning("the file names no pre-tokenizer (tokenizer.ggml.pre): using llama.cpp's 'default'; "
                        "tokenization may differ from the model's training")
        pt = PRE_TYPES[pre]
        n = len(pieces)
        if n == 0 or (types is not None and len(types) != n):
            raise ModelFileError(f"vocabulary sizes disagree: {n} pieces, {None if types is None else len(types)} "
                                 f"types")
        self.n_vocab = n
        self.pre = pre
        self._pre = pre_tokenizer(pt.expressions)
        self._ignore_merges = pt.ignore_merges
        self.bos_id, self.eos_id, self.unk_id = int(bos_id), int(eos_id), int(unk_id)
        self.add_bos = bool(pt.add_bos) if add_bos is None else bool(add_bos)
        self.add_eos, self.add_space_prefix = bool(add_eos), bool(add_space_prefix)
        self.texts: list[bytes] = [bytes(p) for p in pieces]
        tt = [int(t) for t in types] if types is not None else [NORMAL] * n
        # text -> id, later ids winning; llama.cpp names empty entries "[EMPTY_<id>]"
        self._t2id: dict[str, int] = {}
        for i, t in enumerate(self.texts):
            self._t2id[t.decode("utf-8", "surrogateescape") if t else f"[EMPTY_{i}]"] = i
        self.eog_ids, self.eot_id = end_of_generation(self.texts, tt, self.eos_id, special_ids or {})
        self.types = np.asarray(tt, dtype=np.int32)
        self._ranks: dict[tuple[str, str], int] = {}
        for rank, m in enumerate(merges):
            m = m.decode("utf-8", "surrogateescape") if isinstance(m, (bytes, bytearray)) else str(m)
            pos = m.find(" ", 1)
            left, right = (m[:pos], m[pos + 1:]) if pos >= 0 else ("", "")
            self._ranks.setdefault((left, right), rank)     # std::unordered_map::emplace keeps the first
        self._piece, self._piece_special = _pieces(self.texts, tt)
        # special tokens cut out of the text before pre-tokenization: user-defined always, control/unknown on request
        self._specials = [(t, i, tt[i]) for i, t in enumerate(self.texts)
                          if tt[i] in (CONTROL, USER_DEFINED, UNKNOWN)]
        self._specials.sort(key=lambda x: -len(x[0]))          # longest first (ties: by id)
        self._special_str = [(t.decode("utf-8", "surrogateescape"), i, ty == USER_DEFINED)
                             for t, i, ty in self._specials]
        # per-byte fallback for a symbol that is not a token: llama.cpp looks up each UTF-8 byte of its spelling
        self._byte_fallback = []
        for b in range(256):
            singles = [bytes([x]).decode("utf-8", "surrogateescape") for x in BYTE_CHARS[b].encode()]
            self._byte_fallback.append([self._t2id[c] for c in singles if c in self._t2id])
        self._cache = _WordCache(self._word_ids)            # word -> its token ids
        self._tables: Any = None

    # ---------------------------------------------------------------- construction from files
    @classmethod
    def from_model_file(cls, mf: Any) -> "BPETokenizer":
        v, hp, md = mf.vocab, mf.hparams, getattr(mf, "metadata", {}) or {}
        if v.merges is None:
            raise ModelFileError("byte-level BPE vocabulary without tokenizer.ggml.merges",
                                 path=getattr(mf, "path", None))

        def flag(key: str) -> Optional[bool]:
            val = md.get("tokenizer.ggml." + key)
            return None if val is None else bool(val)

        n = len(v.pieces)

        def tok_id(key: str, default: int) -> int:
            val = md.get("tokenizer.ggml." + key)
            return int(val) if isinstance(val, (int, np.integer)) and 0 <= int(val) < n else default

        specials = {k: tok_id(k + "_token_id", -1) for k in ("eot", "eom", "fim_pad", "fim_rep", "fim_sep")}
        return cls(v.pieces, v.types, v.merges, v.pre or "", bos_id=tok_id("bos_token_id", 11),
                   eos_id=tok_id("eos_token_id", 11), unk_id=tok_id("unknown_token_id", -1),
                   add_bos=flag("add_bos_token"), add_eos=bool(flag("add_eos_token")),
                   add_space_prefix=bool(flag("add_space_prefix")), special_ids=specials)

    def warmup(self) -> None:
        """Build the pre-tokenizer's expressions and tables, the merge tables and the compiled merge loop of long
        words (or load it from Numba's cache) now, at load, so that no request waits for them."""
        self.encode("Warm up: 123, ünïcödé\n", add_bos=False)
        self._merge_fast(b"x" * (_NUMBA_MIN + 1))

    # ---------------------------------------------------------------- encode
    def encode(self, text: str | bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of `text` (str or UTF-8 bytes), as llama.cpp's `llama_tokenize(add_special=add_bos,
        parse_special=special)`: BOS (EOS) added only when `add_bos` and the file asks for it."""
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = decode_utf8(bytes(text))
        elif not isinstance(text, str):
            raise RequestError(f"cannot tokenize a {type(text).__name__}; expected str or bytes")
        out: list[int] = [self.bos_id] if add_bos and self.add_bos else []
        for frag in self._partition(text, special):
            if isinstance(frag, int):
                out.append(frag)
            else:
                self._encode_fragment(frag, out)
        if add_bos and self.add_eos:
            out.append(self.eos_id)
        return out

    def _partition(self, text: str, special: bool) -> list:
        """llama.cpp tokenizer_st_partition: for each special token, longest first, cut its leftmost
        non-overlapping occurrences out of the text fragments that are left. Fragments are str, tokens int."""
        if not text:
            return []
        taken: list[tuple[int, int, int]] = []        # (start, end, id), sorted by start
        # Vocabularies list thousands of such tokens (DeepSeek's 2385 "[PAD100015]"...): one search per distinct
        # first few characters rules most of them out, instead of one search of the whole text per token.
        heads: dict[str, bool] = {}
        for t, tid, user in self._special_str:
            if not (special or user):
                continue
            head = t[:_SPECIAL_HEAD]
            present = heads.get(head)
            if present is None:
                present = heads[head] = head in text
            if not present or t not in text:
                continue
            at = text.find(t)
            while at >= 0:
                end = at + len(t)
                k = bisect.bisect_left(taken, (at,))
                if (k and taken[k - 1][1] > at) or (k < len(taken) and taken[k][0] < end):
                    # overlaps a longer token already cut out: the search goes on inside that fragment
                    at = text.find(t, at + 1)
                    continue
                taken.insert(k, (at, end, tid))
                at = text.find(t, end)
        if not taken:
            return [text]
        out: list = []
        pos = 0
        for s, e, tid in taken:
            if s > pos:
                out.append(text[pos:s])
            out.append(tid)
            pos = e
        if pos < len(text):
            out.append(text[pos:])
        return out

    def _encode_fragment(self, text: str, out: list[int]) -> None:
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        out.extend(chain.from_iterable(map(self._cache.__getitem__, self._pre.split(text))))

    def _word_ids(self, word: str) -> list[int]:
        """llm_tokenizer_bpe_session::tokenize for one word."""
        raw = word.encode("utf-8", "surrogatepass")
        enc = raw.decode("latin-1").translate(BYTE_ENCODE)
        t2id = self._t2id
        if self._ignore_merges:
            tid = t2id.get(enc)
            if tid is not None:
                return [tid]
        if len(enc) > _NUMBA_MIN:
            return self._merge_fast(raw)
        parts = list(enc)
        ranks = self._ranks
        while len(parts) > 1:
            best, at = None, -1
            for i in range(len(parts) - 1):
                r = ranks.get((parts[i], parts[i + 1]))
                if r is not None and (best is None or r < best):
                    best, at = r, i
            if best is None:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        out: list[int] = []
        for p in parts:
            tid = t2id.get(p)
            if tid is not None:
                out.append(tid)
            else:
                for c in p:
                    out.extend(self._byte_fallback[CHAR_BYTE[c]] if c in CHAR_BYTE else [])
        return out

    def _merge_fast(self, raw: bytes) -> list[int]:
        """The merge with the compiled loop of the SentencePiece tokenizer: one symbol per byte, pair table over
        symbol ids (tokens keep their ids; merge results that are not tokens get ids from n_vocab up)."""
        base, pair_keys, pair_vals, pair_rank, byte_ids, n_ids = self._merge_tables()
        data = np.frombuffer(raw, dtype=np.uint8)
        n = data.size
        starts = np.arange(n, dtype=np.int64)
        lens = np.ones(n, dtype=np.int64)
        sym = base[data]
        ids = merge_symbols(data, starts, lens, sym, pair_keys, pair_vals, pair_rank, byte_ids, np.int64(n_ids),
                            np.int64(self.n_vocab))
        return ids.tolist()

    def _merge_tables(self):
        if self._tables is not None:
            return self._tables
        sym_id: dict[str, int] = dict(self._t2id)
        next_id = self.n_vocab

        def sid(s: str) -> int:
            nonlocal next_id
            i = sym_id.get(s)
            if i is None:
                i = sym_id[s] = next_id
                next_id += 1
            return i

        base = np.array([sid(c) for c in BYTE_CHARS], dtype=np.int64)
        keys, vals, ranks = [], [], []
        for (left, right), rank in self._ranks.items():
            if not left or not right:
                continue
            keys.append((sid(left), sid(right)))
            vals.append(sid(left + right))
            ranks.append(rank)
        n_ids = next_id
        k = np.array([a * n_ids + b for a, b in keys], dtype=np.int64)
        o = np.argsort(k, kind="stable")
        # merged symbols that are not tokens spell out their bytes (exact where each byte's character is ASCII or
        # its UTF-8 bytes are not tokens, as in every byte-level vocabulary)
        fb = np.array([ids[0] if len(ids) == 1 else -1 for ids in self._byte_fallback], dtype=np.int64)
        self._tables = (base, k[o], np.array(vals, np.int64)[o], np.array(ranks, np.int64)[o], fb, n_ids)
        return self._tables


class _WordCache(dict):
    """word -> token ids, computed on first lookup (so a text's words are looked up in one C-level map)."""

    def __init__(self, compute) -> None:
        super().__init__()
        self._compute = compute

    def __missing__(self, word: str) -> list[int]:
        ids = self[word] = self._compute(word)
        return ids


def _decode_text(text: bytes) -> bytes:
    """llama_decode_text: each GPT-2 byte character back to its byte (others as llama.cpp's [UNK_BYTE_...])."""
    s = decode_utf8(text)
    out = bytearray()
    for c in s:
        b = CHAR_BYTE.get(c)
        if b is not None:
            out.append(b)
        else:
            out += b"[UNK_BYTE_0x" + c.encode("utf-8", "surrogatepass").hex().encode() + text + b"]"
    return bytes(out)


def _pieces(texts: list[bytes], types: list[int]) -> tuple[list[bytes], list[bytes]]:
    """token_to_piece without and with `special`, per token."""
    plain, special = [], []
    for t, ty in zip(texts, types):
        if ty == NORMAL:
            p = _decode_text(t)
            plain.append(p), special.append(p)
        elif ty == USER_DEFINED:
            plain.append(t), special.append(t)
        elif ty in (CONTROL, UNKNOWN):
            plain.append(b""), special.append(t)
        else:                                   # byte, unused and undefined types print nothing in a BPE vocabulary
            plain.append(b""), special.append(b"")
    return plain, special

