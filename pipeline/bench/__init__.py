"""Benchmarks: ``python -m pipeline.bench {encoder,pipeline,nightly,ep} ...``.

- ``encoder``: the encoder alone, packed path vs. the straightforward baseline (no Ray).
- ``pipeline``: the Ray Data job vs. the encoder alone (needs Ray).
- ``nightly``: incremental nightly runs vs. a full run (needs Ray).
- ``ep``: expert parallelism vs. whole-model replicas (no Ray).
- ``workload``: the length mixes, token ids, texts and corpora they share.

``encoder`` and ``ep`` import no Ray (the GPU machines that run them have none): the other
two import the jobs only when they run.
"""
