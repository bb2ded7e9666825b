"""``iris serve``: an OpenAI-compatible HTTP server on Iris's own engine, so front ends share one loaded model.

``wire`` (the request and answer formats), ``device_queue`` (the line for the device), ``app`` (the Starlette
routes) and ``server`` (socket and uvicorn); the command is ``cli/serve_cmd.py``.
"""
