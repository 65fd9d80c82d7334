"""Built-in protocol adapters (installed as `airobackend.adapters`), each a pluggy plugin registered exactly like a
third-party one: `kobold` (KoboldAI United + KoboldCpp extras), `textgen` (text-generation-webui legacy API),
`openai` (OpenAI-compatible API + text-generation-webui's /v1/internal routes).

Adapters translate protocol requests into `airobackend.types.GenerationRequest` and events back; they never touch
kernels or tokens directly, and the core never imports them.
"""
