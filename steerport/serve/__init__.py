"""``steerport serve``: an OpenAI-compatible HTTP server with per-request steers.

Modules: :mod:`~steerport.serve.rows` (per-row steer values), :mod:`~steerport.serve.engine`
(the batching decode loop), :mod:`~steerport.serve.protocol` (request validation, the OpenAI
shapes), :mod:`~steerport.serve.limits`, :mod:`~steerport.serve.info` (what /v1/steers shows),
:mod:`~steerport.serve.app` (FastAPI routes and the playground), :mod:`~steerport.serve.command`
(the CLI command).
"""
