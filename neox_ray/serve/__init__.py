"""The online endpoint: one ``LLM`` per Ray Serve replica behind an OpenAI-compatible HTTP API.

- :mod:`~neox_ray.serve.protocol`: request schemas and OpenAI-shaped response bodies (pure pydantic).
- :mod:`~neox_ray.serve.errors`: the OpenAI error shape and the exception handlers that produce it.
- :mod:`~neox_ray.serve.auth`: API keys from an environment variable or a file.
- :mod:`~neox_ray.serve.request_body`: ASGI middleware bounding request bodies (413) and reading them as JSON.
- :mod:`~neox_ray.serve.metrics`: the server's metrics feed and its sinks (``GET /metrics``: one replica's view).
- :mod:`~neox_ray.serve.server`: the FastAPI app over one :class:`AsyncLLMEngine` (no Ray import; testable
  in-process).
- :mod:`~neox_ray.serve.deployment`: the Serve deployment and the application builder used by
  ``serve run`` / ``serve deploy`` and ``neox-ray serve``.
- :mod:`~neox_ray.serve.cli`: the ``neox-ray serve`` command.

Generation itself is the engine's: this package never runs a generation loop of its own.
"""
