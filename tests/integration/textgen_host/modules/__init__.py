"""A miniature of text-generation-webui's `modules` package, in the two generations an extension meets (../README.md).

GENERATION chooses which one the submodules follow; the harness sets it before it imports them:
* "v2.8.1": the tag v2.8.1 (c19b995b, 2025-04-19): `custom_generate_reply` gets the drawn seed, the OpenAI API is the
  extension `extensions/openai`, extensions live in `extensions/`;
* "current": oobabooga/text-generation-webui at 1dcde41d (2026-05-03): no seed argument (since ae02ffc6,
  2025-04-20), the API is `modules/api`, extensions live in `user_data/extensions/` or `extensions/`.
"""
GENERATIONS = ("v2.8.1", "current")
GENERATION = "current"
