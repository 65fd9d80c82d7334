"""One model name in every protocol: the library's name (the file name) wherever a protocol reports a model, except
KoboldCpp's GET /api/v1/model, which KoboldAI Lite and SillyTavern parse as `koboldcpp/<file name without its
extension>` (KoboldCpp's own answer; docs/clients.md says so)."""
from __future__ import annotations

from starlette.testclient import TestClient

from airobackend.adapters.kobold import kobold_model_name

from fakes import make_app


def test_the_model_name_is_the_same_in_every_protocol(demo_engine):
    c = TestClient(make_app(demo_engine))
    name = demo_engine.model_info()["name"]
    assert name.endswith(".gguf")
    seen = {
        "textgen info": c.post("/api/v1/model", json={"action": "info"}).json()["result"]["model_name"],
        "textgen list": c.post("/api/v1/model", json={"action": "list"}).json()["result"][1],
        "openai models": c.get("/v1/models").json()["data"][0]["id"],
        "openai completion": c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).json()["model"],
        "openai chat": c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                            "max_tokens": 1}).json()["model"],
        "internal info": c.get("/v1/internal/model/info").json()["model_name"],
        "internal list": c.get("/v1/internal/model/list").json()["model_names"][0],
        "kobold admin list": c.get("/api/admin/list_options").json()[-1],
    }
    assert set(seen.values()) == {name}, seen
    assert c.get("/api/v1/model").json() == {"result": "koboldcpp/" + name[:-len(".gguf")]}
    assert kobold_model_name(name) == name[:-len(".gguf")]
