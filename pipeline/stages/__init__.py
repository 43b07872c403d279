"""The pipeline's stages as small classes and functions over Arrow tables. No Ray import.

- ``embed``: :class:`~pipeline.stages.embed.TokenizeStage` and
  :class:`~pipeline.stages.embed.EncodeStage` (heavy state in ``__init__``, work in
  ``__call__``; the encode stage is given its engine: an embedder, or an expert-parallel group).
- ``diff``: the nightly job's diff of today's rows against the previous snapshot.
- ``carry``: the nightly job's copy of a touched unit's unchanged files from the previous
  snapshot (the rows of files that did not change, in a unit where some did).

``pipeline/cluster/graph.py`` wires them with Ray Data.
"""
