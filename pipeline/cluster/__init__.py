"""Everything that touches Ray: the only package of the pipeline that imports ``ray``.

- ``session``: connect to a cluster or start a local Ray, read its resources, Ray Data's
  settings (progress bars, resource limits), the messages Ray prints.
- ``graph``: the Ray Data graph of a run (read -> tokenize -> encode -> write), and the
  nightly job's diff before it.
- ``expert_groups``: expert-parallel rank actors in a placement group (``--expert-parallel``).
- ``tasks``: plain Ray tasks over a list of calls (the enrich job's file rewrites).

The stages it runs (``pipeline/stages``) and the I/O they call (``pipeline/io``) import no
Ray, so tests call them directly.
"""
