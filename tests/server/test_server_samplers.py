"""DRY, XTC, smoothing and top-nσ through every protocol: field mapping (SillyTavern's dialect included), their
effect on the output, and bad values answered with a 400 in the protocol's shape naming the field."""
from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from airobackend.adapters import kobold, openai, textgen

ST_KOBOLDCPP = {   # what SillyTavern's Text Completion -> KoboldCpp sends for these samplers
    "dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": 0,
    "dry_sequence_breakers": '["\\n", ":", "\\"", "*"]', "xtc_threshold": 0.1, "xtc_probability": 0.5,
    "smoothing_factor": 0.2, "smoothing_curve": 1.0, "nsigma": 1.5,
}


@pytest.fixture
def client(demo_app):
    return TestClient(demo_app)


@pytest.mark.parametrize("mapper", [
    lambda b: kobold.to_generation_request(b, n_ctx=2048, n_vocab=32000),
    lambda b: openai.to_generation_request(b, n_ctx=2048, n_vocab=32000, chat=False),
    lambda b: textgen.to_generation_request(b, n_ctx=2048, n_vocab=32000),
])
def test_fields_reach_the_sampler(mapper):
    s = mapper(dict(ST_KOBOLDCPP, prompt="p")).sampling
    assert (s.dry_multiplier, s.dry_base, s.dry_allowed_length, s.dry_penalty_last_n) == (0.8, 1.75, 2, 0)
    assert s.dry_sequence_breakers == ("\n", ":", "\"", "*")
    assert (s.xtc_threshold, s.xtc_probability, s.smoothing_factor, s.smoothing_curve, s.nsigma) == \
        (0.1, 0.5, 0.2, 1.0, 1.5)
    s = mapper({"prompt": "p", "dry_sequence_breakers": ["\n", "Chapter"], "top_n_sigma": 2.0}).sampling
    assert s.dry_sequence_breakers == ("\n", "Chapter") and s.nsigma == 2.0


def test_protocol_defaults():
    k = kobold.to_generation_request({"prompt": "p"}, n_ctx=2048, n_vocab=32000).sampling
    assert (k.dry_multiplier, k.dry_base, k.dry_allowed_length, k.dry_penalty_last_n, k.xtc_threshold,
            k.xtc_probability) == (0.0, 1.75, 2, 320, 0.2, 0.0)                 # KoboldCpp 1.76 API defaults
    t = textgen.to_generation_request({"prompt": "p", "repetition_penalty_range": 500}, n_ctx=2048,
                                      n_vocab=32000).sampling
    # text-generation-webui: its breaker default, XTC threshold 0.1, DRY over repetition_penalty_range
    assert t.dry_sequence_breakers == ("\n", ":", "\"", "*") and t.xtc_threshold == 0.1
    assert t.dry_penalty_last_n == 500
    t = textgen.to_generation_request({"prompt": "p", "dry_sequence_breakers": '"\\n", ":"'}, n_ctx=2048,
                                      n_vocab=32000).sampling
    assert t.dry_sequence_breakers == ("\n", ":")      # its own comma-separated form without brackets


def test_the_output_changes_with_each_sampler(client):
    base = {"prompt": "Once upon a time", "max_length": 40, "temperature": 1.2, "top_k": 0, "top_p": 1.0,
            "sampler_seed": 3, "use_default_badwordsids": True}

    def text(**kw):
        r = client.post("/api/v1/generate", json=dict(base, **kw))
        assert r.status_code == 200, r.text
        return r.json()["results"][0]["text"]

    plain = text()
    assert plain == text()
    for kw in (dict(dry_multiplier=2.0, dry_allowed_length=1), dict(xtc_probability=1.0, xtc_threshold=0.05),
               dict(smoothing_factor=4.0), dict(nsigma=0.3)):
        assert text(**kw) != plain, kw
    greedy = dict(temperature=0, top_k=1)
    assert text(dry_multiplier=0.8, **greedy) != text(**greedy)


BAD = [
    ({"dry_multiplier": -1}, "dry_multiplier"), ({"dry_multiplier": "lots"}, "dry_multiplier"),
    ({"dry_base": 1000}, "dry_base"), ({"dry_allowed_length": 1.5}, "dry_allowed_length"),
    ({"dry_penalty_last_n": -5}, "dry_penalty_last_n"),
    ({"dry_sequence_breakers": ["x"] * 10_000}, "dry_sequence_breakers"),
    ({"dry_sequence_breakers": "[\"\\n\", "}, "dry_sequence_breakers"),
    ({"dry_sequence_breakers": [1, 2]}, "dry_sequence_breakers"),
    ({"xtc_threshold": 2}, "xtc_threshold"), ({"xtc_probability": [0.5]}, "xtc_probability"),
    ({"smoothing_factor": -0.5}, "smoothing_factor"), ({"smoothing_curve": 50}, "smoothing_curve"),
    ({"nsigma": "wide"}, "nsigma"), ({"top_n_sigma": 1e9}, "top_n_sigma"),
]


@pytest.mark.parametrize("body, field", BAD)
def test_bad_values_are_a_400_naming_the_field_in_each_protocol(client, body, field):
    r = client.post("/api/v1/generate", json=dict(body, prompt="x", max_length=2))
    assert r.status_code == 400 and field in r.json()["detail"]["msg"]
    r = client.post("/v1/completions", json=dict(body, prompt="x", max_tokens=2))
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"]
    r = client.post("/v1/chat/completions", json=dict(body, messages=[{"role": "user", "content": "x"}],
                                                        max_tokens=2))
    assert r.status_code == 400 and r.json()["error"]["param"] == field
    r = client.post("/api/v1/generate", json=dict(body, prompt="x", max_new_tokens=2))        # text-generation-webui
    assert r.status_code == 400 and field in r.json()["detail"]["msg"]
    assert client.post("/api/v1/generate", json={"prompt": "x", "max_length": 2}).status_code == 200


def test_phrase_bans_through_every_protocol(client):
    import json
    greedy = {"temperature": 0, "top_k": 1, "rep_pen": 1.0, "use_default_badwordsids": True}
    text = client.post("/api/v1/generate", json=dict(greedy, prompt="Once upon a time", max_length=60)).json()[
        "results"][0]["text"]
    phrase = " ".join(text.split()[4:6])
    assert phrase in text

    def kobold(route, **kw):
        body = dict(greedy, prompt="Once upon a time", max_length=60, **kw)
        r = client.post(route, json=body)
        assert r.status_code == 200, r.text
        if route.endswith("stream"):
            events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
            return "".join(e["token"] for e in events)
        return r.json()["results"][0]["text"]

    for route in ("/api/v1/generate", "/api/extra/generate/stream"):
        for field in ("banned_tokens", "banned_strings"):          # KoboldCpp's name and SillyTavern's
            out = kobold(route, **{field: [phrase.upper()]})
            assert phrase.lower() not in out.lower() and out != text
    r = client.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 60, "temperature": 0,
                                             "banned_strings": [phrase], "ban_eos_token": True})
    assert phrase not in r.json()["choices"][0]["text"]
    r = client.post("/api/v1/generate", json={"prompt": "Once upon a time", "max_new_tokens": 60, "do_sample": False,
                                              "banned_strings": [phrase], "ban_eos_token": True})
    assert phrase not in r.json()["results"][0]["text"]


# ---------------------------------------------------------------------------------------------- sampler_priority
# text-generation-webui's default list (modules/presets.py at oobabooga/text-generation-webui 1dcde41), which
# SillyTavern's text-generation-webui mode sends as a list; its own API also takes it as one string.
TGW_PRIORITY = ["repetition_penalty", "presence_penalty", "frequency_penalty", "dry", "temperature",
                "dynamic_temperature", "quadratic_sampling", "top_n_sigma", "top_k", "top_p", "typical_p",
                "epsilon_cutoff", "eta_cutoff", "tfs", "top_a", "min_p", "adaptive_p", "mirostat", "xtc",
                "encoder_repetition_penalty", "no_repeat_ngram"]
TGW_MAPPERS = [
    lambda b: openai.to_generation_request(b, n_ctx=2048, n_vocab=32000, chat=False).sampling,
    lambda b: openai.to_generation_request(b, n_ctx=2048, n_vocab=32000, chat=True, prompt="p").sampling,
    lambda b: textgen.to_generation_request(b, n_ctx=2048, n_vocab=32000).sampling,
]


@pytest.mark.parametrize("mapper", TGW_MAPPERS)
def test_sampler_priority_sets_the_order(mapper):
    def order(**kw):
        return mapper(dict(kw, prompt="p")).sampler_order

    # KoboldCpp ids: 0 top_k, 1 top_a, 2 top_p + min_p, 3 tfs, 4 typical, 5 temperature, 6 penalties
    assert order(sampler_priority=TGW_PRIORITY) == (6, 5, 0, 2, 4, 3, 1)
    assert order(sampler_priority="\n".join(TGW_PRIORITY)) == (6, 5, 0, 2, 4, 3, 1)
    assert order(sampler_priority="min_p, typical_p,temperature") == (6, 0, 1, 3, 2, 4, 5)   # unnamed run first
    assert order(sampler_priority="quadratic_sampling\ntop_k") == (6, 1, 3, 4, 2, 5, 0)
    assert order(sampler_priority=TGW_PRIORITY, temperature_last=True) == (6, 0, 2, 4, 3, 1, 5)
    assert order(sampler_order=[5, 0], temperature_last=True) == (0, 5)
    assert order(sampler_order=[5, 0]) == (5, 0)
    assert order(sampler_priority="", sampler_order=[5, 0]) == (5, 0)        # empty: absent, as upstream
    # KoboldCpp has neither field: its route keeps sampler_order
    k = kobold.to_generation_request({"prompt": "p", "sampler_priority": ["temperature"], "temperature_last": True,
                                      "sampler_order": [5, 0]}, n_ctx=2048, n_vocab=32000)
    assert k.sampling.sampler_order == (5, 0)


def test_sampler_priority_changes_what_the_sampler_keeps():
    import numpy as np

    from airobackend.sampling import Sampler
    logits = np.array([1.0, 3.0, 2.0, 0.5, 2.5, -1.0, 0.0, 1.5], dtype=np.float32)

    def kept(**kw):
        body = dict(kw, prompt="p", temperature=3.0, top_p=0.6, seed=1)
        s = Sampler(textgen.to_generation_request(body, n_ctx=64, n_vocab=8).sampling, n_vocab=8)
        return set(s.distribution(logits)[0].tolist())

    first = kept(sampler_priority=["temperature", "top_p"])   # top_p over the flattened distribution keeps more
    last = kept(sampler_priority=["top_p", "temperature"])
    assert len(first) > len(last)
    assert kept(sampler_priority=["temperature", "top_p"], temperature_last=True) == last


def test_sampler_priority_changes_the_output(client):
    base = {"prompt": "Once upon a time", "max_new_tokens": 40, "temperature": 3.0, "top_p": 0.3, "top_k": 0,
            "seed": 5, "repetition_penalty": 1.0}
    routes = [("/api/v1/generate", base, lambda r: r["results"][0]["text"]),
              ("/v1/completions", dict(base, max_tokens=40), lambda r: r["choices"][0]["text"])]
    for route, body, text_of in routes:
        def text(**kw):
            r = client.post(route, json=dict(body, **kw))
            assert r.status_code == 200, r.text
            return text_of(r.json())

        first = text(sampler_priority="temperature\ntop_p")
        last = text(sampler_priority="top_p\ntemperature")
        assert first == text(sampler_priority=["temperature", "top_p"]) and first != last, route
        assert text(sampler_priority="temperature\ntop_p", temperature_last=True) == last, route


TGW_BAD = [
    ({"sampler_priority": ["top_k", "warp_drive"]}, "sampler_priority", "warp_drive"),
    ({"sampler_priority": "temperature\nTop-P"}, "sampler_priority", "top-p"),
    ({"sampler_priority": 5}, "sampler_priority", "list"),
    ({"sampler_priority": ["top_k", 3]}, "sampler_priority", "list"),
    ({"sampler_priority": ["top_k"] * 65}, "sampler_priority", "65"),
    ({"temperature_last": "maybe"}, "temperature_last", "boolean"),
]


@pytest.mark.parametrize("body, field, word", TGW_BAD)
def test_bad_sampler_priority_is_a_400_on_each_route(client, body, field, word):
    r = client.post("/api/v1/generate", json=dict(body, prompt="x", max_new_tokens=2))     # text-generation-webui
    assert r.status_code == 400 and field in r.json()["detail"]["msg"] and word in r.json()["detail"]["msg"]
    for route, extra in (("/v1/completions", {"prompt": "x"}),
                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        r = client.post(route, json=dict(body, max_tokens=2, **extra))
        assert r.status_code == 400, route
        err = r.json()["error"]
        assert err["param"] == field and word in err["message"], route
    r = client.post("/api/v1/generate", json={"prompt": "x", "max_new_tokens": 2, "sampler_priority": TGW_PRIORITY})
    assert r.status_code == 200
