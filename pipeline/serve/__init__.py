"""The query service: an OpenAI-compatible ``POST /v1/embeddings`` on Ray Serve, with the batch
jobs' encoder, so a served vector equals ``Embedder.encode`` of the same text and task.

- ``config``: ``ServeConfig``, every option of ``python -m pipeline serve``, declared once.
- ``protocol``: the OpenAI contract: requests checked, responses and error envelopes (pure).
- ``inputs``: texts -> token ids (the batch job's prefix rule and tokenizer), pieces (pure).
- ``admission``: the ingress's queue limit and ``Retry-After`` (pure).
- ``identity``: the served model (weights fingerprint, tokenizer hash, widths) and the
  ``--expect-output`` check against a batch output's ``_manifest/_run.json``.
- ``metrics``, ``app``, ``server``: the parts that import Ray: the Prometheus metrics, the
  Serve deployments (ingress, encoder replicas) and the process that runs them.

See docs/serve.md.
"""
