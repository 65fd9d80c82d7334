"""Speculative decoding (airobackend.speculative + the engine's verifying passes): the output is the plain output.

Drafts come from the model itself, from its other quantization (same weights, same vocabulary), from a different
model of the same vocabulary (fxgqa: nearly every draft rejected) and from prompt lookup; the target is a quantized
fixture model, whose batched pass gives the same logits as one-token passes, so greedy and seeded sampled output must
match plain decoding token for token, through rejections, phrase-ban rewinds, context shifts and prompt-cache reuse.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

from airobackend.errors import ModelFileError
from airobackend.speculative import DraftModel, PromptLookup, check_vocab
from airobackend.types import GenerationRequest, SamplingParams
from tests.conftest import needs_fixtures

pytestmark = needs_fixtures

PROMPT = [1, 450, 439, 860, 289, 798, 113, 285, 114, 123, 432, 398, 567, 975, 278, 425, 125, 124, 437, 106, 49, 438,
          113, 346]
TARGET = "fx-q8_0.gguf"
GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.0)


def _llama(fixtures_dir, n_ctx=256, **kw):
    from airobackend.llama import Llama
    models = fixtures_dir / "models"
    if isinstance(kw.get("draft_model"), str):
        kw["draft_model"] = str(models / kw["draft_model"])
    return Llama(str(models / TARGET), n_ctx=n_ctx, n_threads=2, verbose=False, **kw)


def _ids(engine, req: GenerationRequest) -> tuple[list[int], str]:
    ids, reason = [], None
    for ev in engine.generate(req):
        ids.extend(ev.token_ids)
        reason = ev.finish_reason
    return ids, reason


@pytest.fixture(scope="module")
def plain(fixtures_dir):
    return _llama(fixtures_dir).engine


DRAFTERS = {
    "itself": dict(draft_model=TARGET, draft_p_min=0.0),
    "q4_0 twin": dict(draft_model="fx-q4_0.gguf"),
    "other model": dict(draft_model="fxgqa-q4_0.gguf", draft_n=3),
    "lookup 1": dict(lookup_ngram=1),
    "lookup 2": dict(lookup_ngram=2, draft_n=4),
}


@pytest.fixture(scope="module", params=list(DRAFTERS))
def spec(request, fixtures_dir):
    """An engine that drafts for every token (its governor, which pauses drafting while it measures slower than
    plain decoding, never pauses), so each draft path runs whatever the machine's timing."""
    from airobackend.speculative import Governor
    engine = _llama(fixtures_dir, **DRAFTERS[request.param]).engine
    engine.governor = Governor.always()
    return request.param, engine


def test_greedy_output_is_the_plain_output_token_for_token(plain, spec):
    name, engine = spec
    req = GenerationRequest(tokens=PROMPT, max_tokens=64, sampling=GREEDY)
    before = dict(engine.spec_stats)
    assert _ids(engine, req) == _ids(plain, req)
    drafted = engine.spec_stats["drafted"] - before["drafted"]
    accepted = engine.spec_stats["accepted"] - before["accepted"]
    assert drafted > 0, f"{name}: nothing was drafted, so nothing was tested"
    if name == "itself":
        assert accepted == drafted              # the model agrees with itself on every greedy token
    if name == "other model":
        assert accepted < drafted               # the rejection path ran


def test_sampled_output_is_the_plain_output_for_each_seed(plain, spec):
    """Drawing each token from the target's logits and accepting a drafted token only when it is the one drawn is
    speculative sampling's accept/reject rule for deterministic drafts: the tokens follow the target distribution.
    With the same seed, the very same tokens come out as without speculation."""
    name, engine = spec
    before = dict(engine.spec_stats)
    for seed in range(6):
        req = GenerationRequest(tokens=PROMPT, max_tokens=24,
                                sampling=SamplingParams(temperature=0.7, top_k=0, top_p=1.0, seed=seed,
                                                        repetition_penalty=1.1))
        assert _ids(engine, req) == _ids(plain, req), f"{name}, seed {seed}"
    if name in ("itself", "q4_0 twin"):
        assert engine.spec_stats["accepted"] > before["accepted"]
        assert engine.spec_stats["drafted"] > engine.spec_stats["accepted"]     # some draws differed from drafts


def test_prompt_cache_reuse_after_rejected_drafts(plain, spec):
    """A generation that ends on a stop string in the middle of a verified draft leaves in the cache only the tokens
    kept (the drafted entries after them are cut); a second request that extends its prompt reuses that cache."""
    name, engine = spec
    out, _ = _ids(plain, GenerationRequest(tokens=PROMPT, max_tokens=20, sampling=GREEDY))
    stop = bytes(plain.tokenizer.decode(out[12:13])).decode("utf-8", "ignore")
    first = GenerationRequest(tokens=PROMPT, max_tokens=60, sampling=GREEDY, stop=(stop,))
    assert _ids(engine, first) == _ids(plain, first)
    assert engine.model.cache.n_past == len(engine._cache)
    second = GenerationRequest(tokens=PROMPT + out[:7] + [450, 439], max_tokens=20, sampling=GREEDY)
    assert _ids(engine, second) == _ids(plain, second)


def test_context_shift_and_phrase_bans_with_drafts(fixtures_dir):
    plain_engine = _llama(fixtures_dir, n_ctx=48).engine
    spec_engine = _llama(fixtures_dir, n_ctx=48, draft_model=TARGET, draft_p_min=0.0).engine   # default governor
    req = GenerationRequest(tokens=PROMPT, max_tokens=80, sampling=GREEDY)
    want, _ = _ids(plain_engine, req)
    assert len(want) == 80                     # 24 + 80 > 48: the context was shifted
    assert _ids(spec_engine, req)[0] == want
    # ban a two-token phrase that greedy decoding produces: generation rewinds into verified drafts
    tok = plain_engine.tokenizer
    phrase = bytes(tok.decode(want[10:12])).decode("utf-8", "ignore").strip()
    if len(phrase) < 2:
        phrase = bytes(tok.decode(want[20:22])).decode("utf-8", "ignore").strip()
    banned = GenerationRequest(tokens=PROMPT, max_tokens=40, sampling=SamplingParams(
        temperature=0.0, repetition_penalty=1.0, banned_strings=(phrase,)))
    got = _ids(spec_engine, banned)
    assert got == _ids(plain_engine, banned)
    assert got[0][:40] != want[:40]           # the ban changed the output, so the rewind ran


def test_a_draft_model_of_another_vocabulary_is_refused(fixtures_dir):
    with pytest.raises(ModelFileError, match="vocabulary has 32000 tokens"):
        _llama(fixtures_dir, draft_model="fx32k-q4_0.gguf")


def test_check_vocab_names_the_first_token_that_differs(fixtures_dir):
    from airobackend.formats import open_model
    from airobackend.tokenizer import Tokenizer
    with open_model(str(fixtures_dir / "models" / TARGET)) as mf:
        tok = Tokenizer.from_model_file(mf)
    other = copy.copy(tok)
    other.texts = list(tok.texts)
    other.texts[700] = b"something else"
    check_vocab(tok, copy.copy(tok))
    with pytest.raises(ModelFileError, match="token 700"):
        check_vocab(tok, other)
    other = copy.copy(tok)
    other.eos_id = 0
    with pytest.raises(ModelFileError, match="BOS/EOS"):
        check_vocab(tok, other)


def test_draft_model_drafts_its_own_greedy_continuation(fixtures_dir):
    d = DraftModel(str(fixtures_dir / "models" / TARGET), num_pred_tokens=5, p_min=0.0, n_ctx=128, n_threads=2)
    ref = np.load(fixtures_dir / "reference" / "fx-q8_0.npz")
    draft = d(np.asarray(PROMPT, np.intc))
    # llama.cpp's greedy continuation of the same prompt, up to where its two best logits are too close to call
    assert list(draft[:3]) == list(ref["greedy"][:3])
    assert len(draft) == 5
    assert list(d(np.asarray(PROMPT + list(draft[:2]), np.intc))[:3]) == list(draft[2:5])   # cache reused
    assert list(d(np.asarray(PROMPT, np.intc), num_pred_tokens=2)) == list(draft[:2])      # the caller's cap


def test_prompt_lookup_copies_what_followed_the_last_occurrence():
    look = PromptLookup(ngram=2, num_pred_tokens=3)
    assert list(look([5, 6, 7, 8, 9, 5, 6, 1, 2, 5, 6])) == [1, 2, 5]       # the most recent earlier "5 6"
    assert list(look([5, 6, 7, 8])) == []
    assert list(look([5, 6, 7, 5, 6])) == [7, 5, 6]
    assert list(PromptLookup(ngram=1, num_pred_tokens=8)([3, 4, 3])) == [4, 3]
    assert list(look([5, 6, 7, 5, 6], num_pred_tokens=2)) == [7, 5]          # the caller's cap
    with pytest.raises(ValueError):
        PromptLookup(ngram=0)


def test_settings_from_cli_and_environment():
    from airobackend.cli import build_parser
    from airobackend.commands.serve import settings_from_args
    from airobackend.settings import Settings

    args = build_parser().parse_args(["serve", "--draftmodel", "small.gguf", "--draftamount", "4", "--draft-p-min",
                                      "0.5"])
    s = settings_from_args(args, environ={"AIRO_LOOKUP_NGRAM": "3"})
    assert (s.draft_model, s.draft, s.draft_p_min, s.lookup_ngram) == ("small.gguf", 4, 0.5, 3)
    args = build_parser().parse_args(["run", "-md", "d.gguf", "--lookup-ngram", "2", "--draft", "6"])
    from airobackend.commands.run import build_settings
    s = build_settings(args, environ={})
    assert (s.draft_model, s.lookup_ngram, s.draft) == ("d.gguf", 2, 6)
    assert Settings.from_env({"AIRO_DRAFT_MODEL": "x.gguf"}).draft_model == "x.gguf"


def test_any_drafter_with_llama_cpp_pythons_interface(fixtures_dir, plain):
    """llama-cpp-python's LlamaDraftModel interface: drafter(input_ids: np.ndarray[intc]) -> token ids; ids beyond
    the vocabulary end the draft."""
    class Wrong:
        calls = 0

        def __call__(self, input_ids, /, **kwargs):
            Wrong.calls += 1
            assert input_ids.dtype == np.intc
            return np.array([5, 6, 7, 5000, 8], dtype=np.intc)

    from airobackend.speculative import Governor
    engine = _llama(fixtures_dir, draft_model=Wrong()).engine
    engine.governor = Governor.always()         # full-length drafts every token, whatever the clock says
    req = GenerationRequest(tokens=PROMPT, max_tokens=16, sampling=GREEDY)
    assert _ids(engine, req) == _ids(plain, req)
    passes = engine.spec_stats["passes"]
    assert Wrong.calls > 0 and passes > 0
    assert 3 * (passes - 2) <= engine.spec_stats["drafted"] <= 3 * passes   # 3 each, fewer at the budget's end


def test_governor_pauses_drafting_while_it_loses_and_probes_again():
    from airobackend.speculative import Governor
    g = Governor(alpha=0.5, probe=3)
    assert not g.allow()                        # no yardstick yet: one plain pass first
    g.plain(0.010)                              # 100 tok/s without drafts
    assert g.allow()
    g.verified(0.030, 4)                        # 133 tok/s with them: keep drafting
    assert g.allow() and g.allow()
    g.verified(0.030, 1)                        # a rejected draft: the average falls to 83 tok/s, below 100
    assert [g.allow() for _ in range(4)] == [False, False, False, True]     # paused for 3 tokens, then a probe
    g.verified(0.030, 4)                        # back above (108): drafting goes on
    assert g.allow()
    g.restart()                                 # a new request: the verifying rate is re-learnt, the plain one kept
    assert g.spec_tps is None and g.plain_s == 0.010 and g.allow()


def test_draft_length_grows_while_drafts_are_accepted_and_shrinks_when_not():
    from airobackend.speculative import Governor
    g = Governor(start=3)
    g.plain(0.010)
    assert g.cap(8) == 3 and g.cap(2) == 2
    g.verified(0.015, 4, 3)                     # all three accepted: two more next time
    assert g.cap(8) == 5
    g.verified(0.015, 6, 5)
    assert g.cap(8) == 7 and g.cap(6) == 6
    g.verified(0.030, 2, 7)                     # one of seven accepted: at most one more than were accepted
    assert g.cap(8) == 2
    g.verified(0.030, 1, 2)                     # none accepted: one fewer, never below one
    g.verified(0.030, 1, 1)
    assert g.cap(8) == 1
    g.restart()
    assert g.cap(8) == 3
    assert Governor.always().cap(8) == 8


def test_free_text_drafts_stay_short(fixtures_dir, plain):
    """A drafter that is always wrong costs short verifying passes only: the length falls to one token."""
    class Wrong:
        def __call__(self, input_ids, /, **kwargs):
            return np.full(kwargs.get("num_pred_tokens", 8), 5, dtype=np.intc)

    engine = _llama(fixtures_dir, draft_model=Wrong()).engine
    engine.governor.probe = 0                   # keep drafting whatever the clock says: the length is under test
    req = GenerationRequest(tokens=PROMPT, max_tokens=16, sampling=GREEDY)
    assert _ids(engine, req) == _ids(plain, req)
    s = engine.spec_stats
    assert s["passes"] >= 8 and s["drafted"] <= 3 + 2 + (s["passes"] - 2) + s["accepted"]


@pytest.mark.e2e       # `airobackend run` as a subprocess
def test_run_command_with_a_draft_model_prints_the_same_text_and_the_counts(fixtures_dir):
    import subprocess
    import sys

    model = str(fixtures_dir / "models" / TARGET)
    base = [sys.executable, "-m", "airobackend", "run", "-m", model, "-p", "The quick brown fox", "-n", "24",
            "--temp", "0", "-t", "2", "--no-display-prompt"]
    plain = subprocess.run(base, capture_output=True, text=True, timeout=300)
    spec = subprocess.run(base + ["-md", model, "--draft-p-min", "0", "--draft", "4"], capture_output=True, text=True,
                          timeout=300)
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr[-2000:]
    assert spec.stdout == plain.stdout and len(plain.stdout) > 10
    assert "tokens drafted" in spec.stderr and "tokens drafted" not in plain.stderr
    other = subprocess.run(base + ["-md", str(fixtures_dir / "models" / "fx32k-q4_0.gguf")], capture_output=True,
                           text=True, timeout=300)
    assert other.returncode == 1 and "same vocabulary" in other.stderr and "Traceback" not in other.stderr
