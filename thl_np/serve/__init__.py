"""``thl-np serve``: an OpenAI-compatible HTTP server whose conversations keep their THL state.

``engine`` (the one worker that runs the model, continuous batching), ``sessions`` (sessions on disk and the
prefix cache), ``text`` (the chat template, stop strings), ``app`` (the ASGI routes, needs the ``[serve]``
extra: starlette + uvicorn). docs/SERVING.md describes the API.
"""
