"""Serving: the OpenAI-compatible API, the web UI (chat, playground, arena) and its store.

`kotonoha.serve.app.serve_main` starts a server; `python -m kotonoha.serve --help` does too.
Nothing is imported here, so `kotonoha` verbs that do not serve never load FastAPI.
"""
