"""Serving: the backtracking decoder behind an OpenAI-compatible API on Ray Serve.

* ``config``: ``ServeCfg`` (model, engine, decoding defaults and bounds, streaming mode, limits, auth,
  HTTP and replicas), the typed config of ``jobs/serve.py``.
* ``engine``: token streams from the evaluation engines (HF ``generate`` with dynamic batching;
  ``vllm_engine``: vLLM's ``AsyncLLM`` with its continuous batching), behind ``StreamEngine``.
* ``protocol``: strict request models, OpenAI error JSON, and responses built from the ``openai``
  package's own models.
* ``app``: the FastAPI routes and the Serve deployment (auth, limits, metrics), ``build_app``.

What a client may see of a generation (shown text, retractions) is decided by
``bt_ray.reset.stream``, the one home of ``[RESET]`` semantics.
"""
