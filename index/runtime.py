"""How FAISS runs in this process: the kernels of the OpenBLAS inside the faiss-cpu wheel (chosen before FAISS
loads) and the OpenMP threads of each search (applied in each thread that searches).

Kernels
-------

FAISS computes an exact search of 20 queries or more as one matrix product (BLAS ``sgemm``), and the
keypoint index's searches of a photo's descriptors are such products too. The faiss-cpu wheel bundles its
own OpenBLAS (0.3.15 in faiss-cpu 1.15), which picks its kernels by CPU model. Models newer than that
release are not in its table, and it falls back to the oldest x86-64 kernels ("Prescott", SSE3). Measured on
this project's Ice Lake VM (family 6, model 106; 256 queries against 41 vectors, one thread):

==============================  ========  ========
kernels                         512-d     1280-d
==============================  ========  ========
Prescott (the wheel's choice)   0.90 ms   2.34 ms
Haswell (AVX2)                  0.40 ms   0.76 ms
SkylakeX (AVX-512)              0.32 ms   0.70 ms
==============================  ========  ========

OpenBLAS reads ``OPENBLAS_CORETYPE`` once, when the library loads, so :func:`load_faiss` sets it from the
flags the kernel reports in ``/proc/cpuinfo`` (never more than the CPU has) just for that load, and puts the
environment back: libraries loaded afterwards (numpy's own OpenBLAS, say) detect their CPU themselves.
An ``OPENBLAS_CORETYPE`` the operator set is left as it is. Elsewhere (no ``/proc/cpuinfo``, not x86)
nothing is set.

Threads
-------
OpenMP keeps its thread count per thread: ``omp_set_num_threads`` in the main thread leaves every other
thread (the API's inference threads, a rescan's workers) on OpenMP's default team, one thread per core.
Measured on 2 cores, 2 stored-rescan processes each searching 256 queries against 41 vectors from a
worker thread: 20-40 ms of CPU a search with the default team (its threads spin while they wait, against
the other process's), 0.3-1 ms with one. So :func:`set_search_threads` records the count for the process
and :func:`use_search_threads` applies it in the calling thread, once per thread, before each search.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

# Kernels by the flags they need, best first. (OpenBLAS 0.3.15 has no newer x86 kernels for sgemm.)
_CORES: tuple[tuple[str, frozenset[str]], ...] = (
    ("SkylakeX", frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})),
    ("Haswell", frozenset({"avx2", "fma"})),
)
_ENV = "OPENBLAS_CORETYPE"


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first processor in a ``/proc/cpuinfo`` text (empty: none listed)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def openblas_core(flags: Iterable[str]) -> str | None:
    """The best OpenBLAS kernels these CPU flags can run (None: let OpenBLAS detect them)."""
    have = set(flags)
    return next((core for core, needs in _CORES if needs <= have), None)


def _read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def load_faiss() -> str | None:
    """Import faiss with OpenBLAS kernels chosen as the module docstring says; answers the kernels set
    (None: none set, OpenBLAS detects them itself). Without effect when faiss is loaded already (its
    OpenBLAS chose when it loaded)."""
    core = None
    if "faiss" not in sys.modules and _ENV not in os.environ and sys.platform.startswith("linux"):
        core = openblas_core(cpu_flags(_read_cpuinfo()))
    if core is not None:
        os.environ[_ENV] = core
    try:
        import faiss  # noqa: F401
    finally:
        if core is not None:
            os.environ.pop(_ENV, None)
    return core


def faiss_openblas_core() -> str | None:
    """The kernels the OpenBLAS bundled with faiss runs ("Haswell", "Prescott", ...); None where faiss
    brings no OpenBLAS of its own (or it cannot be asked)."""
    import faiss

    libs = Path(faiss.__file__).resolve().parent.parent / "faiss_cpu.libs"
    for lib in sorted(libs.glob("libopenblas*.so*")) if libs.is_dir() else ():
        try:
            # Already loaded by faiss: dlopen answers that copy, whose state is what FAISS uses.
            handle = ctypes.CDLL(str(lib), mode=os.RTLD_NOLOAD)
        except OSError:
            continue
        name = handle.openblas_get_corename
        name.restype = ctypes.c_char_p
        got = name()
        return got.decode() if isinstance(got, bytes) else None
    return None


_search_threads: int | None = None  # None: OpenMP's default in every thread
_applied = threading.local()


def set_search_threads(threads: int) -> None:
    """FAISS's OpenMP threads for every search of the process, in every thread (0: one per core).

    One is right for a service: its concurrency comes from requests, each search is small (a batch of a
    few photos against a catalog), and an OpenMP team started per call on cores that the models and
    other threads already use costs more than it saves (see the module docstring)."""
    global _search_threads
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    _search_threads = threads or os.cpu_count() or 1
    use_search_threads()


def use_search_threads() -> None:
    """Apply :func:`set_search_threads`'s count in the calling thread (once per thread and count)."""
    wanted = _search_threads
    if wanted is not None and getattr(_applied, "threads", None) != wanted:
        import faiss

        faiss.omp_set_num_threads(wanted)
        _applied.threads = wanted
