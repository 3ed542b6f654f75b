"""`vidqa serve`: the model loaded once behind an OpenAI-compatible HTTP API (docs/serve.md).

- config.py: the server's limits and security settings (no web framework imported)
- protocol.py: the OpenAI chat request parsed into api.Settings, and the response bodies
- media.py: where a request's video comes from (local path, file://, data:, http(s)) and its limits
- sessions.py: the LRU of prepared videos (api.Session) under a byte budget
- worker.py: the one generation thread with an asyncio queue in front; streaming and cancelling
- app.py: the FastAPI routes, authentication and error bodies
- client.py: `vidqa ask --server`'s HTTP client (standard library only: no torch, no FastAPI)

Only app.py imports FastAPI (the `serve` extra): `vidqa ask --server` needs none of it.
"""
