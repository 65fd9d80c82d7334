"""SentencePiece-BPE tokenizer exactly as llama.cpp runs it (`llm_tokenizer_spm`, `src/llama-vocab.cpp` at c392e50).

Both vocabulary spellings are normalised into one internal form, the GGUF one:

* GGUF: pieces with U+2581 '▁' for spaces, byte tokens spelled ``<0xXX>``, token types stored.
* GGML v3 (mid-2023 ``convert.py``): plain spaces, byte tokens as the single raw byte (ids 3..258), control tokens
  as the empty string, ``<unk>`` as ``" \\u2047 "``, no types. We rewrite them the way llama.cpp's
  ``convert-llama-ggml-to-gguf.py`` does (unk -> ``<unk>``, empty -> control, 1-byte at id 3+b -> ``<0xXX>``,
  ' ' -> '▁'), so a GGML file and its GGUF twin tokenize identically.

Encoding follows current llama.cpp: spaces are escaped to '▁', a space is prefixed to the text when the vocabulary
says so (``add_space_prefix``, true for LLaMA), then the text is split into UTF-8 characters and adjacent symbols are
merged highest-score first (ties: leftmost first) through a heap while the merged text is a vocabulary entry;
symbols left that are not tokens fall back to byte tokens. That is O(n log n).

Speed: for vocabularies where no piece contains a non-space character followed by '▁' (true for LLaMA; checked at
construction), no merge can cross the start of a word, so the text is cut before every word and each distinct word
is merged once and cached. Long prompts of ordinary text then cost about one dict lookup per word. A fragment over
2 KB (text without spaces: base64, CJK, "=====") runs the same heap algorithm compiled with Numba over integer symbol
ids (`_bpe_fast`), releasing the GIL.
"""
from __future__ import annotations

import heapq
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from airobackend.errors import ModelFileError, RequestError
from airobackend.formats import open_model
from airobackend.kernels import JIT

# llama_token_type (GGUF tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE = "\u2581".encode()               # b'\xe2\x96\x81'
_GGML_UNK = " \u2047 ".encode()
# Length of a UTF-8 sequence from the high nibble of its lead byte (llama.cpp unicode_len_utf8; continuation bytes
# count as 1, so invalid input is still split deterministically).
_UTF8_LEN = bytes([1] * 12 + [2, 2, 3, 4])
# Cut before every '▁' that does not follow another '▁': the start of each word (and of each run of spaces).
_WORD_START = re.compile(rb"(?<!\xe2\x96\x81)(?=\xe2\x96\x81)")
_CACHE_MAX = 1 << 17
_NUMBA_MIN_BYTES = 2048          # longer fragments (texts without spaces) go to the compiled merge loop


def _lstrip_space(t: bytes) -> bytes:
    while t.startswith(SPACE):
        t = t[3:]
    return t


def _normalise_ggml(pieces: Sequence[bytes], bos_id: int, eos_id: int,
                    unk_id: int) -> tuple[list[bytes], list[int]]:
    """GGML v3 spelling -> GGUF spelling + token types, as convert-llama-ggml-to-gguf.py does it."""
    out, types = [], []
    for i, p in enumerate(pieces):
        p = bytes(p)
        if i == unk_id or p == _GGML_UNK:
            out.append(b"<unk>"), types.append(UNKNOWN)
        elif i == bos_id and p == b"":
            out.append(b"<s>"), types.append(CONTROL)
        elif i == eos_id and p == b"":
            out.append(b"</s>"), types.append(CONTROL)
        elif p == b"":
            out.append(b""), types.append(CONTROL)
        elif len(p) == 1 and i - 3 == p[0]:
            out.append(b"<0x%02X>" % p[0]), types.append(BYTE)
        else:
            out.append(p.replace(b" ", SPACE)), types.append(NORMAL)
    return out, types


# llama_vocab::impl::load: token texts that end generation, and those found by text when the file names none
_EOG_TEXTS = (b"<|eot_id|>", b"<|im_end|>", b"<|end|>", b"<end_of_turn>", b"<|endoftext|>", b"<|eom_id|>", b"<EOT>")
_BY_TEXT = {
    "eot": (b"<|eot_id|>", b"<|im_end|>", b"<|end|>", b"<end_of_turn>", b"<|endoftext|>", b"<EOT>",
            "<\uff5cend\u2581of\u2581sentence\uff5c>".encode()),
    "eom": (b"<|eom_id|>",),
    "fim_pad": (b"<|fim_pad|>", b"<fim-pad>", b"<PAD>"),
    "fim_rep": (b"<|fim_repo|>", b"<|repo_name|>", b"<fim-repo>", b"<REPO>"),
    "fim_sep": (b"<|file_sep|>",),
}


def end_of_generation(texts: Sequence[bytes], types: list[int], eos_id: int,
                      special_ids: Mapping[str, int]) -> tuple[frozenset[int], int]:
    """(ids that end generation, the end-of-turn id or -1), as llama.cpp derives them: `special_ids` from the file
    (eot, eom, fim_pad, fim_rep, fim_sep; -1 = absent) else found by their usual texts, plus every token spelled like
    an end-of-turn marker (<|eot_id|>, <|im_end|>, <|endoftext|>, ...) and EOS. Such tokens become control tokens in
    `types` (modified in place), as llama.cpp overrides them, so they print nothing and are parsed as special."""
    ids = {t: i for i, t in enumerate(texts)}
    found: dict[str, int] = {}
    for kind, candidates in _BY_TEXT.items():
        tid = special_ids.get(kind, -1)
        if tid is None or tid < 0:
            tid = next((ids[t] for t in candidates if t in ids), -1)
            if tid >= 0:
                types[tid] = CONTROL
        found[kind] = tid
    eog = {found[k] for k in ("fim_pad", "fim_rep", "fim_sep") if found[k] >= 0}
    for t in _EOG_TEXTS:
        if t in ids:
            eog.add(ids[t])
            types[ids[t]] = CONTROL
    eog.update(i for i in (eos_id, found["eot"], found["eom"]) if 0 <= i < len(texts))
    return frozenset(eog), found["eot"]


class Vocabulary:
    """What both tokenizers (this SentencePiece one and airobackend.bpe's byte-level BPE one) share: printing tokens
    from per-id piece tables (`_piece`, `_piece_special`) and llama-cpp-python's method names."""

    n_vocab: int
    bos_id: int
    add_space_prefix: bool
    _piece: list[bytes]
    _piece_special: list[bytes]

    def encode(self, text: str | bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        raise NotImplementedError

    def tokenize(self, text: str | bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """llama-cpp-python spelling of `encode`."""
        return self.encode(text, add_bos=add_bos, special=special)

    # ---------------------------------------------------------------- decode
    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        """What token `token_id` prints (llama.cpp token_to_piece): the text it stands for (spaces restored, byte
        tokens as their byte), control/unknown tokens empty unless `special`."""
        tid = int(token_id)
        if not 0 <= tid < self.n_vocab:
            raise RequestError(f"token id {tid} out of range (n_vocab {self.n_vocab})")
        return self._piece_special[tid] if special else self._piece[tid]

    def decode(self, ids: Iterable[int], special: bool = False) -> bytes:
        """Bytes of `ids`, as llama-cpp-python's `detokenize`: the pieces concatenated, and when the sequence starts
        with BOS one leading space removed (the one `encode` prefixed), so decode(encode(s)) == s."""
        ids = [int(t) for t in ids]
        pieces = self._piece_special if special else self._piece
        try:
            if any(t < 0 for t in ids):
                raise IndexError
            out = b"".join([pieces[t] for t in ids])
        except IndexError:
            bad = next(t for t in ids if not 0 <= t < self.n_vocab)
            raise RequestError(f"token id {bad} out of range (n_vocab {self.n_vocab})") from None
        if ids and ids[0] == self.bos_id and self.add_space_prefix and out[:1] == b" ":
            out = out[1:]
        return out

    def detokenize(self, ids: Iterable[int], special: bool = False) -> bytes:
        """llama-cpp-python spelling of `decode`."""
        return self.decode(ids, special=special)

    def piece_text(self, token_id: int) -> str:
        """The token's printed text as str (invalid UTF-8 replaced): for logprobs and debugging."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.n_vocab


class Tokenizer(Vocabulary):
    """llama.cpp's SPM tokenizer over one vocabulary.

    `pieces` are the vocabulary entries exactly as stored in the file, `spelling` says which spelling they use
    ('gguf' or 'ggml', see the module docstring). `types` are GGUF token types (None for GGML files).
    """

    def __init__(self, pieces: Sequence[bytes], scores: Sequence[float], types: Optional[Sequence[int]] = None, *,
                 spelling: str = "gguf", bos_id: int = 1, eos_id: int = 2, unk_id: int = 0,
                 add_bos: bool = True, add_space_prefix: bool = True,
                 special_ids: Optional[Mapping[str, int]] = None) -> None:
        n = len(pieces)
        if n == 0 or len(scores) != n or (types is not None and len(types) != n):
            raise ModelFileError(f"vocabulary sizes disagree: {n} pieces, {len(scores)} scores, "
                                 f"{None if types is None else len(types)} types")
        if spelling == "ggml" or (spelling != "gguf" and types is None):
            texts, tt = _normalise_ggml(pieces, bos_id, eos_id, unk_id)
        elif spelling == "gguf":
            texts = [bytes(p) for p in pieces]
            tt = [int(t) for t in types] if types is not None else [NORMAL] * n
        else:
            raise ValueError(f"unknown vocabulary spelling {spelling!r}")
        self.n_vocab = n
        self.bos_id, self.eos_id, self.unk_id = int(bos_id), int(eos_id), int(unk_id)
        self.add_bos, self.add_space_prefix = bool(add_bos), bool(add_space_prefix)
        self.texts: list[bytes] = texts                          # GGUF spelling
        self.eog_ids, self.eot_id = end_of_generation(texts, tt, self.eos_id, special_ids or {})
        self.types = np.asarray(tt, dtype=np.int32)
        self.scores = np.asarray(scores, dtype=np.float32)
        self._score = [float(s) for s in self.scores]            # python floats: fast in the merge loop
        # text -> id over the whole vocabulary, later ids winning (llama.cpp fills token_to_id in id order)
        self._text_to_id: dict[bytes, int] = {}
        for i, t in enumerate(texts):
            self._text_to_id[t if t else b"[EMPTY_%d]" % i] = i
        # what each token prints: llama.cpp token_to_piece (special=False / special=True)
        self._piece: list[bytes] = []
        self._piece_special: list[bytes] = []
        for i, (t, ty) in enumerate(zip(texts, tt)):
            if ty == NORMAL:
                p = t.replace(SPACE, b" ")
                self._piece.append(p), self._piece_special.append(p)
            elif ty == BYTE:
                b = bytes([int(t[3:5], 16)]) if re.fullmatch(rb"<0x[0-9A-Fa-f]{2}>", t) else t
                self._piece.append(b), self._piece_special.append(b)
            elif ty == USER_DEFINED:
                self._piece.append(t), self._piece_special.append(t)
            elif ty in (CONTROL, UNKNOWN):
                self._piece.append(b""), self._piece_special.append(t)
            else:                                               # unused and unknown types print nothing
                self._piece.append(b""), self._piece_special.append(b"")
        # byte fallback: "<0xXX>" first, then the raw 1-byte entry (llama.cpp byte_to_token), else <unk>
        self._byte_id = []
        for b in range(256):
            tid = self._text_to_id.get(b"<0x%02X>" % b)
            if tid is None:
                tid = self._text_to_id.get(bytes([b]), self.unk_id)
            self._byte_id.append(tid)
        # special tokens that encode(special=True) splits out of the text (llama.cpp parse_special)
        specials = [(t, i) for i, (t, ty) in enumerate(zip(texts, tt))
                    if ty in (CONTROL, UNKNOWN, USER_DEFINED) and t]
        specials.sort(key=lambda x: -len(x[0]))              # longest match first
        self._special_ids = {t: i for t, i in specials}
        self._special_re = (re.compile(b"|".join(re.escape(t) for t, _ in specials)) if specials else None)
        # May we cut the text before each word? Only if no piece contains a non-'▁' character followed by '▁'.
        self._word_split = not any(SPACE in _lstrip_space(t) for t in texts)
        self._cache: dict[bytes, list[int]] = {}

    # ---------------------------------------------------------------- construction from files
    @classmethod
    def from_model_file(cls, mf: Any) -> Any:
        """The tokenizer of an opened model file (`airobackend.formats.open_model`): this class for SentencePiece
        vocabularies, `airobackend.bpe.BPETokenizer` for byte-level BPE ones (GGUF tokenizer.ggml.model gpt2)."""
        v, hp = mf.vocab, mf.hparams
        if getattr(v, "model", "llama") == "gpt2":
            from airobackend.bpe import BPETokenizer        # here: bpe builds on this module (a cycle at the top)
            return BPETokenizer.from_model_file(mf)
        md = getattr(mf, "metadata", None) or {}

        def hp_get(name: str, default: Any) -> Any:
            val = getattr(hp, name, None)
            return default if val is None else val

        specials = {}
        for kind in ("eot", "eom", "fim_pad", "fim_rep", "fim_sep"):
            val = md.get(f"tokenizer.ggml.{kind}_token_id")
            specials[kind] = int(val) if isinstance(val, (int, np.integer)) and 0 <= int(val) < len(v) else -1
        return cls(v.pieces, v.scores, v.types, spelling=getattr(v, "spelling", "gguf"),
                   bos_id=hp_get("bos_id", 1), eos_id=hp_get("eos_id", 2), unk_id=hp_get("unk_id", 0),
                   add_bos=hp_get("add_bos", True), add_space_prefix=hp_get("add_space_prefix", True),
                   special_ids=specials)

    @classmethod
    def from_file(cls, path: str) -> Any:
        """Open `path` vocabulary-only and build its tokenizer (see `from_model_file`)."""
        with open_model(path, vocab_only=True) as mf:
            return cls.from_model_file(mf)

    # ---------------------------------------------------------------- encode
    def encode(self, text: str | bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of `text` (str or UTF-8 bytes), as llama.cpp's `llama_tokenize(add_special=add_bos,
        parse_special=special)`: BOS first when `add_bos` and the file asks for it (tokenizer.ggml.add_bos_token, true
        for LLaMA and every GGML file), a space prefixed when the vocabulary wants one.
        With `special=True` the texts of control tokens (``<s>``, ``</s>``, ...) in `text` become those tokens."""
        if isinstance(text, str):
            text = text.encode("utf-8", errors="surrogatepass")
        elif not isinstance(text, (bytes, bytearray, memoryview)):
            raise RequestError(f"cannot tokenize a {type(text).__name__}; expected str or bytes")
        text = bytes(text)
        out: list[int] = [self.bos_id] if add_bos and self.add_bos else []
        if not text:
            return out
        if special and self._special_re is not None:
            prev_special, pos = True, 0
            for m in self._special_re.finditer(text):
                if m.start() > pos:
                    self._encode_fragment(text[pos:m.start()], prev_special, out)
                out.append(self._special_ids[m.group(0)])
                prev_special, pos = True, m.end()
            if pos < len(text):
                self._encode_fragment(text[pos:], prev_special, out)
        else:
            self._encode_fragment(text, True, out)
        return out

    def _encode_fragment(self, text: bytes, prefix_space: bool, out: list[int]) -> None:
        if self.add_space_prefix and prefix_space:
            text = b" " + text
        text = text.replace(b" ", SPACE)
        if not self._word_split:
            out.extend(self._bpe(text))
            return
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            # invalid UTF-8 may put a multi-byte symbol across a word start: merge the whole fragment at once
            out.extend(self._bpe(text))
            return
        cache, bpe = self._cache, self._bpe
        for word in _WORD_START.split(text):
            ids = cache.get(word)
            if ids is None:
                ids = bpe(word)
                if len(cache) >= _CACHE_MAX:
                    cache.clear()
                cache[word] = ids
            out.extend(ids)

    def warmup(self) -> None:
        """Compile (or load from Numba's cache) the merge loop of long fragments, so that no request waits for it."""
        self.encode(b"x" * (_NUMBA_MIN_BYTES + 1), add_bos=False)

    def _bpe(self, text: bytes) -> list[int]:
        """llm_tokenizer_spm_session::tokenize on one escaped fragment."""
        n_bytes = len(text)
        if n_bytes == 0:
            return []
        if n_bytes > _NUMBA_MIN_BYTES:
            return self._bpe_fast(text)
        return self._bpe_py(text)

    def _bpe_py(self, text: bytes) -> list[int]:
        """The merge loop in Python: quickest for short words (no array set-up)."""
        n_bytes = len(text)
        # symbols: one per UTF-8 character (start offset, byte length), doubly linked
        starts: list[int] = []
        lens: list[int] = []
        off = 0
        while off < n_bytes:
            ln = min(_UTF8_LEN[text[off] >> 4], n_bytes - off)
            starts.append(off)
            lens.append(ln)
            off += ln
        n = len(starts)
        if n == 1:
            return self._resegment(text, 0, lens[0])
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        t2id, score = self._text_to_id, self._score
        heap: list[tuple[float, int, int, int]] = []
        push = heapq.heappush
        for i in range(1, n):
            s = starts[i - 1]
            tid = t2id.get(text[s:s + lens[i - 1] + lens[i]])
            if tid is not None:
                heap.append((-score[tid], i - 1, i, lens[i - 1] + lens[i]))
        heapq.heapify(heap)
        pop = heapq.heappop
        while heap:
            _, left, right, size = pop(heap)
            ll, rl = lens[left], lens[right]
            if ll == 0 or rl == 0 or ll + rl != size:
                continue                                      # stale: one side already merged
            lens[left] = size
            lens[right] = 0
            nr = nxt[right]
            nxt[left] = nr
            if nr >= 0:
                prev[nr] = left
            pl = prev[left]
            if pl >= 0:
                s = starts[pl]
                tid = t2id.get(text[s:s + lens[pl] + size])
                if tid is not None:
                    push(heap, (-score[tid], pl, left, lens[pl] + size))
            if nr >= 0:
                s = starts[left]
                tid = t2id.get(text[s:s + size + lens[nr]])
                if tid is not None:
                    push(heap, (-score[tid], left, nr, size + lens[nr]))
        out: list[int] = []
        i = 0
        while i != -1:
            tid = t2id.get(text[starts[i]:starts[i] + lens[i]])
            if tid is not None:
                out.append(tid)
            else:
                out.extend(self._resegment(text, starts[i], lens[i]))
            i = nxt[i]
        return out

    def _bpe_fast(self, text: bytes) -> list[int]:
        """The same merge loop compiled with Numba, over integer symbol ids and a sorted table of mergeable pairs.

        Every symbol during the merge is either one UTF-8 character of the input or a vocabulary entry (a merge only
        happens when the merged text is one), so "text(a) + text(b) is in the vocabulary" can be precomputed as a
        table (id(a), id(b)) -> merged id over all vocabulary entries split at every character boundary. Characters
        that are not entries get ids from n_vocab up; ones that occur in no entry get -1 and never merge.
        """
        tables = self._pair_tables()
        data = np.frombuffer(text, dtype=np.uint8)
        starts, lens = _utf8_chunks(data)
        char_keys, char_ids, pair_keys, pair_vals, pair_rank, byte_ids, n_ids = tables
        keys = _chunk_keys(data, starts, lens)
        pos = np.searchsorted(char_keys, keys)
        pos[pos >= char_keys.size] = 0
        sym = np.where(char_keys[pos] == keys, char_ids[pos], -1).astype(np.int64)
        out = merge_symbols(data, starts, lens, sym, pair_keys, pair_vals, pair_rank, byte_ids, np.int64(n_ids),
                            np.int64(self.n_vocab))
        return out.tolist()

    def _pair_tables(self):
        t = getattr(self, "_fast_tables", None)
        if t is not None:
            return t
        char_id: dict[bytes, int] = {}
        for text, tid in self._text_to_id.items():
            if len(_split_chars(text)) == 1:
                char_id[text] = tid
        next_id = self.n_vocab
        for text in self._text_to_id:
            for c in _split_chars(text):
                if c not in char_id:
                    char_id[c] = next_id
                    next_id += 1
        sym_id = dict(char_id)
        sym_id.update(self._text_to_id)
        n_ids = next_id
        pairs: dict[int, int] = {}
        for text, tid in self._text_to_id.items():
            chars = _split_chars(text)
            off = 0
            for c in chars[:-1]:
                off += len(c)
                a, b = sym_id.get(text[:off]), sym_id.get(text[off:])
                if a is not None and b is not None:
                    pairs[a * n_ids + b] = tid
        ck = np.array([_char_key(c) for c in char_id], dtype=np.int64)
        cv = np.array(list(char_id.values()), dtype=np.int64)
        o = np.argsort(ck)
        pk = np.array(list(pairs.keys()), dtype=np.int64)
        pv = np.array(list(pairs.values()), dtype=np.int64)
        po = np.argsort(pk)
        # dense rank of each score, best first: equal scores share a rank (ties then go to the leftmost pair)
        uniq = np.unique(self.scores.astype(np.float64))[::-1]
        rank = np.searchsorted(-uniq, -self.scores.astype(np.float64)).astype(np.int64)
        t = (ck[o], cv[o], pk[po], pv[po], rank[pv[po]],
             np.array(self._byte_id, dtype=np.int64), n_ids)
        self._fast_tables = t
        return t

    def _resegment(self, text: bytes, start: int, length: int) -> list[int]:
        # Every merged symbol is a vocabulary entry, so only single characters can miss: they go to byte tokens.
        tid = self._text_to_id.get(text[start:start + length])
        if tid is not None:
            return [tid]
        return [self._byte_id[b] for b in text[start:start + length]]


# ---------------------------------------------------------------------------- compiled merge loop (long fragments)
def _split_chars(text: bytes) -> list[bytes]:
    out, off = [], 0
    while off < len(text):
        ln = min(_UTF8_LEN[text[off] >> 4], len(text) - off)
        out.append(text[off:off + ln])
        off += ln
    return out


def _char_key(c: bytes) -> int:
    # up to 4 bytes and the length, as one integer: the same key _chunk_keys computes
    return (len(c) << 32) | int.from_bytes(c.ljust(4, b"\0"), "big")


def _jit(fn):
    import numba                # at the first compile: importing this module stays free of Numba (start-up)

    return numba.njit(**JIT)(fn)


_compiled: dict = {}


def _kernel(name: str):
    k = _compiled.get(name)
    if k is None:
        k = _compiled[name] = _jit(globals()["_py" + name])
    return k


def _utf8_chunks(data: np.ndarray):
    return _kernel("_utf8_chunks")(data)


def _chunk_keys(data, starts, lens):
    return _kernel("_chunk_keys")(data, starts, lens)


def merge_symbols(data, starts, lens, sym, pair_keys, pair_vals, pair_rank, byte_ids, n_ids, n_vocab):
    """The compiled merge loop (see `_py_merge_symbols`); byte-level BPE uses it too, with its merge ranks."""
    return _kernel("_merge_symbols")(data, starts, lens, sym, pair_keys, pair_vals, pair_rank, byte_ids, n_ids,
                                     n_vocab)


def _py_utf8_chunks(data):
    n = data.size
    starts = np.empty(n, np.int64)
    lens = np.empty(n, np.int64)
    k = 0
    off = 0
    while off < n:
        hi = data[off] >> 4
        ln = 1 if hi < 12 else (2 if hi < 14 else (3 if hi == 14 else 4))
        if ln > n - off:
            ln = n - off
        starts[k] = off
        lens[k] = ln
        k += 1
        off += ln
    return starts[:k], lens[:k]


def _py_chunk_keys(data, starts, lens):
    keys = np.empty(starts.size, np.int64)
    for i in range(starts.size):
        v = np.int64(0)
        for j in range(4):
            v = v << 8
            if j < lens[i]:
                v |= np.int64(data[starts[i] + j])
        keys[i] = (np.int64(lens[i]) << 32) | v
    return keys


def _py_merge_symbols(data, starts, lens, sym, pair_keys, pair_vals, pair_rank, byte_ids, n_ids, n_vocab):
    """Merge adjacent symbols best pair first (lowest `pair_rank`, then leftmost) while (sym[a], sym[b]) is a key of
    `pair_keys` (a * n_ids + b, sorted; `pair_vals` the merged symbol). Symbols left that are not tokens
    (id >= n_vocab or < 0) are spelled with `byte_ids` of their bytes, skipping negative ones."""
    n = starts.size
    lens = lens.astype(np.int32)       # int32 symbol arrays: half the memory traffic of int64
    sym = sym.astype(np.int32)
    prev = np.arange(-1, n - 1).astype(np.int32)
    nxt = np.arange(1, n + 1).astype(np.int32)
    nxt[n - 1] = -1
    cap = n + 16                       # grows by doubling when full
    # 4-ary min-heap of one int64 key per entry: (dense score rank of the merged token << 40) | left symbol, i.e.
    # higher score first, then the leftmost pair (llama.cpp llm_bigram_spm::comparator); the payload packs the
    # right symbol and the merged byte size (staleness check)
    hk = np.empty(cap, np.int64)
    hp = np.empty(cap, np.int64)
    n_heap = 0
    npk = pair_keys.size
    LEFT_MASK = (np.int64(1) << 40) - 1
    SIZE_MASK = (np.int64(1) << 20) - 1
    cand_l = np.empty(2, np.int32)
    cand_r = np.empty(2, np.int32)
    seed_i = 0
    while True:
        n_cand = 0
        if seed_i < n - 1:
            cand_l[0] = seed_i
            cand_r[0] = seed_i + 1
            n_cand = 1
            seed_i += 1
        else:
            if n_heap == 0:
                break
            k_top = hk[0]
            p_top = hp[0]
            n_heap -= 1
            kx = hk[n_heap]
            px = hp[n_heap]
            i = 0
            while True:                                  # sift the last entry down from the root
                c = 4 * i + 1
                if c >= n_heap:
                    break
                best = c
                end = c + 4 if c + 4 <= n_heap else n_heap
                for j in range(c + 1, end):
                    if hk[j] < hk[best]:
                        best = j
                if hk[best] < kx:
                    hk[i] = hk[best]
                    hp[i] = hp[best]
                    i = best
                else:
                    break
            hk[i] = kx
            hp[i] = px
            a = np.int32(k_top & LEFT_MASK)
            b = np.int32(p_top >> 20)
            if lens[a] == 0 or lens[b] == 0 or lens[a] + lens[b] != (p_top & SIZE_MASK):
                continue                                 # stale: one side merged since
            key = np.int64(sym[a]) * n_ids + sym[b]
            sym[a] = pair_vals[np.searchsorted(pair_keys, key)]
            lens[a] += lens[b]
            lens[b] = 0
            nb = nxt[b]
            nxt[a] = nb
            if nb >= 0:
                prev[nb] = a
            if prev[a] >= 0:
                cand_l[n_cand] = prev[a]
                cand_r[n_cand] = a
                n_cand += 1
            if nb >= 0:
                cand_l[n_cand] = a
                cand_r[n_cand] = nb
                n_cand += 1
        for q in range(n_cand):
            left = cand_l[q]
            right = cand_r[q]
            if sym[left] < 0 or sym[right] < 0:
                continue
            key = np.int64(sym[left]) * n_ids + sym[right]
            p = np.searchsorted(pair_keys, key)
            if p < npk and pair_keys[p] == key:
                kx = (pair_rank[p] << 40) | np.int64(left)
                px = (np.int64(right) << 20) | np.int64(lens[left] + lens[right])
                if n_heap == cap:
                    cap *= 2
                    hk2 = np.empty(cap, np.int64)
                    hp2 = np.empty(cap, np.int64)
                    hk2[:n_heap] = hk[:n_heap]
                    hp2[:n_heap] = hp[:n_heap]
                    hk = hk2
                    hp = hp2
                i = n_heap
                n_heap += 1
                while i > 0:                             # sift up
                    par = (i - 1) // 4
                    if kx < hk[par]:
                        hk[i] = hk[par]
                        hp[i] = hp[par]
                        i = par
                    else:
                        break
                hk[i] = kx
                hp[i] = px
    out = np.empty(data.size, np.int64)
    k = 0
    i = 0
    while i != -1:
        if 0 <= sym[i] < n_vocab:
            out[k] = sym[i]
            k += 1
        else:
            for j in range(lens[i]):
                b = byte_ids[data[starts[i] + j]]
                if b >= 0:
                    out[k] = b
                    k += 1
        i = nxt[i]
    return out[:k]
