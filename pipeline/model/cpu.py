"""CPU-side process tuning for encoder workers: their heap, their threads, their environment.

Nothing here imports torch at module level: a worker sets its OpenMP thread count before
torch's first import in the process (:func:`set_threads`).

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap``
and returns it to the OS on free, so each large activation tensor of a CPU forward pass
(``[T, F]`` for T ~ 8k tokens is ~100 MB) is page-faulted in from scratch. Measured on the
2-core dev machine: an erf GELU over 7514 x 3072 fp32 took 33 ms with fresh pages and 7 ms
with reused ones. Keeping freed memory in the heap removes that cost for the whole forward.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# Set when a CPU encoder worker process starts (the encoder actors, and each expert-parallel
# rank). Ray Data calls a map actor's function on a thread other than the main one, and glibc
# gives such threads their own arenas, whose heaps cannot hold a ~100 MB activation: each one
# is mmap-ed and page-faulted afresh (7x the minor faults of the main thread; 685 vs 781
# tokens/s on the dev machine). One arena makes the retained heap (below) serve them.
CPU_WORKER_ENV = {"MALLOC_ARENA_MAX": "1"}

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied = False


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (no per-tensor mmap/munmap). Process-wide.

    Idempotent; returns False where it does not apply (not Linux/glibc). Peak memory is
    unchanged: the heap keeps what the largest forward pass needed, as the CUDA caching
    allocator does on GPU.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied


def set_threads(threads: int) -> None:
    """Give torch ``threads`` intra-op threads, through OpenMP's environment when possible.

    Ray starts actors with ``OMP_NUM_THREADS`` = their logical CPUs (1). ``set_num_threads``
    after torch started with that value runs measurably slower on CPU (760 vs 815 tokens/s
    on the 2-core dev machine) than OpenMP initialised with the right count, so the variable
    is set before torch's first import in this process; the stage modules never import torch
    at module level.
    """
    if "torch" not in sys.modules:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch  # lazy: after OMP_NUM_THREADS is set

    torch.set_num_threads(threads)


def default_threads(replicas_per_node: int) -> int:
    """Torch threads for a CPU encoder actor: this node's usable cores shared by the replicas."""
    return max(1, len(os.sched_getaffinity(0)) // max(replicas_per_node, 1))


# The CPU features that decide how fast half precision runs on a CPU: AMX tiles (bf16/int8
# matmuls through oneDNN), AVX-512 BF16 (bf16 dot products), AVX-512 FP16, and the AVX-512 and
# AVX2 baselines. Without the bf16 ones, bf16 matmuls are emulated and slower than fp32.
CPU_FEATURES = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_fp16", "avx512f", "avx2")


def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """Which of :data:`CPU_FEATURES` this CPU has (its first ``flags`` line; () without one)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return tuple(name for name in CPU_FEATURES if name in flags)
    except OSError:
        pass
    return ()


def has_bf16_matmul(features: tuple[str, ...] | None = None) -> bool:
    """Whether bf16 matmuls run natively here (AMX or AVX-512 BF16), not emulated."""
    features = cpu_features() if features is None else features
    return "amx_bf16" in features or "avx512_bf16" in features
