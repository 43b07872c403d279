"""Host-device traffic of the encoder: packed ids in, pooled vectors out, without stalls.

On CUDA (``overlap``): a packed batch is copied into pinned host memory while the host prepares
the window, and from there to the device on a side stream, non-blocking, so the next batch's
ids travel while the current batch computes; the compute stream waits on the copy's event, never
the host. Only the pooled vectors come back, already in the output dtype, into pinned host
memory, non-blocking; the host waits once, when the window's vectors are all queued
(:meth:`DeviceStaging.wait`). Elsewhere every step is a plain copy (none at all on the CPU), so
the CPU's results are those of a plain loop.

What a CPU cannot show (the copies overlapping the kernels, the pinned blocks' reuse) is measured
by ``python -m pipeline.bench gpu`` on a GPU; the order of the calls and the absence of a host
sync in the device phase are tested here (``tests/test_embedder.py``, ``tests/test_gpu_path.py``).
"""

from __future__ import annotations

import dataclasses

import torch

from .encoder import NomicMoEEncoder
from .packed import PackedBatch
from .pooling import matryoshka, mean_pool


@dataclasses.dataclass(frozen=True)
class Upload:
    """A packed batch on its way to the device; ``event`` is recorded when it has arrived."""

    batch: PackedBatch
    event: torch.cuda.Event | None


class DeviceStaging:
    """How packed batches reach ``device`` and pooled vectors come back to the host."""

    def __init__(self, device: torch.device, overlap: bool | None = None) -> None:
        """``overlap`` (default: on CUDA) pins, copies on a side stream and does not block;
        tests set it on another device type with ``torch.cuda``'s stream calls stubbed."""
        self.device = device
        self.overlap = device.type == "cuda" if overlap is None else overlap
        self._copy_stream = torch.cuda.Stream(device) if self.overlap else None

    def pin(self, packed: PackedBatch) -> PackedBatch:
        """``packed`` in page-locked memory (the source a non-blocking DMA needs); on the host
        side of the window, before the device is busy with it. Unchanged without overlap."""
        return packed.pin_memory() if self.overlap else packed

    def upload(self, packed: PackedBatch) -> Upload:
        """Start copying ``packed`` to the device (on the side stream with overlap)."""
        if not self.overlap:
            return Upload(packed.to(self.device), None)
        with torch.cuda.stream(self._copy_stream):
            moved = packed.to(self.device)  # non-blocking: pinned source, side stream
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        return Upload(moved, event)

    def ready(self, upload: Upload) -> PackedBatch:
        """The uploaded batch, usable on the current stream: the stream (not the host) waits
        for the copy, and the caching allocator learns the tensors are used there."""
        if upload.event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(upload.event)
            for t in upload.batch.tensors():
                t.record_stream(stream)
        return upload.batch

    def host_buffer(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """Where vectors land on the host: ``[rows, cols]``, pinned with overlap."""
        return torch.empty((rows, cols), dtype=dtype, pin_memory=self.overlap)

    def download(self, host_RC: torch.Tensor, device_RC: torch.Tensor) -> None:
        """Queue the copy of ``device_RC`` into ``host_RC`` (read only after :meth:`wait`)."""
        host_RC.copy_(device_RC, non_blocking=self.overlap)

    def wait(self) -> None:
        """Block the host until every queued download has landed (one sync per window)."""
        if self.overlap:
            torch.cuda.current_stream(self.device).synchronize()


def encode_packed(encoder: NomicMoEEncoder, staging: DeviceStaging, packed_G: list[PackedBatch],
                  dims: tuple[int, ...], dtype: torch.dtype, pooled: bool = False,
                  steps: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The device phase of a window: the packed batches in order, the next one's ids uploaded
    before the current one's forward is queued; per batch only its width vectors (``dtype``,
    side by side: ``[B, sum(dims)]``) and, with ``pooled``, its float32 pooled vectors
    (``[B, D]``) are queued back to the host. Nothing here waits for the device: the vectors,
    ``[R, sum(dims)]`` and ``[R, D]`` in the batches' order, are readable after
    ``staging.wait()``. ``steps`` pads the call with idle steps (expert parallelism)."""
    rows = sum(p.num_seqs for p in packed_G)
    vectors_RW = staging.host_buffer(rows, sum(dims), dtype)
    pooled_RD = staging.host_buffer(rows, encoder.config.hidden_size, torch.float32) \
        if pooled else None
    upload = staging.upload(packed_G[0]) if packed_G else None
    start = 0
    for g, packed in enumerate(packed_G):
        current = staging.ready(upload)
        if g + 1 < len(packed_G):
            upload = staging.upload(packed_G[g + 1])  # travels while batch g computes
        pooled_BD = mean_pool(encoder.forward_packed(current), current)
        widths_BW = torch.cat([v.to(dtype) for v in matryoshka(pooled_BD, dims).values()], 1)
        end = start + packed.num_seqs
        staging.download(vectors_RW[start:end], widths_BW)
        if pooled:
            staging.download(pooled_RD[start:end], pooled_BD)
        start = end
    for _ in range(len(packed_G), steps):
        encoder.forward_idle()
    return vectors_RW, pooled_RD
