"""index/runtime.py: FAISS's OpenBLAS kernels chosen from the CPU's flags before it loads (checked in a fresh
interpreter, through the library's own answer), and its OpenMP thread count applied in every thread that
searches (OpenMP keeps the count per thread)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest

from embeddings.keypoints import SiftExtractor
from index import FaissReferenceIndex
from index.keypoint_index import FaissKeypointIndex
from index.runtime import cpu_flags, openblas_core, set_search_threads
from service.domain.model import ReferenceKind
from service.settings import IndexSettings
from tests.index.oracle import mixture

ROOT = Path(__file__).resolve().parents[2]

ICE_LAKE = """processor\t: 0
vendor_id\t: GenuineIntel
model\t\t: 106
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx avx2 avx512f avx512dq avx512cd avx512bw avx512vl

processor\t: 1
flags\t\t: fpu sse sse2
"""


def test_the_kernels_are_the_best_the_first_processors_flags_can_run() -> None:
    assert cpu_flags(ICE_LAKE) >= {"avx2", "avx512f"}
    assert openblas_core(cpu_flags(ICE_LAKE)) == "SkylakeX"
    assert openblas_core({"sse2", "avx", "avx2", "fma"}) == "Haswell"
    assert openblas_core({"avx512f", "avx2"}) is None  # AVX-512 without FMA: not enough for either
    assert openblas_core({"sse2", "sse3", "avx"}) is None  # left to OpenBLAS's own detection
    assert cpu_flags("processor : 0\nmodel name : unknown\n") == frozenset()


def _fresh(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True,
                          text=True, timeout=120, check=True)
    return done.stdout.strip()


ASK = ("import os, index; from index.runtime import faiss_openblas_core; "
       "print(faiss_openblas_core(), os.environ.get('OPENBLAS_CORETYPE'))")


def test_importing_index_loads_faiss_with_the_kernels_of_this_cpu_and_puts_the_environment_back() -> None:
    wanted = openblas_core(cpu_flags(Path("/proc/cpuinfo").read_text()))
    core, left = _fresh(ASK).split()
    assert left == "None"  # numpy's or another library's OpenBLAS loaded later detects its CPU itself
    if wanted is not None:
        # (On this project's VM the wheel's OpenBLAS picks "Prescott" by itself: 2-3x slower products.)
        assert core == wanted


def test_an_operators_openblas_coretype_is_left_as_it_is() -> None:
    core, left = _fresh(ASK, OPENBLAS_CORETYPE="Prescott").split()
    assert (core, left) == ("Prescott", "Prescott")


@pytest.fixture
def odd_thread_count() -> Iterator[int]:
    """A FAISS thread count no thread would have by default (OpenMP's default is one per core)."""
    count = (os.cpu_count() or 1) + 5
    set_search_threads(count)
    yield count
    set_search_threads(1)


def _threads_in_a_new_thread(search: Callable[[], object]) -> int:
    seen: list[int] = []

    def run() -> None:
        search()
        seen.append(faiss.omp_get_max_threads())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return seen[0]


def test_a_reference_search_in_any_thread_runs_on_the_configured_threads(odd_thread_count: int) -> None:
    data = mixture(200, 32, clusters=4, queries=30, seed=3)
    index = FaissReferenceIndex(32, IndexSettings(), model_id="m", kind=ReferenceKind.PRODUCT)
    index.add(data.ids, data.vectors)
    assert _threads_in_a_new_thread(lambda: index.search(data.queries, 5)) == odd_thread_count


def test_a_keypoint_search_in_any_thread_runs_on_the_configured_threads(odd_thread_count: int,
                                                                        grocery_dir: Path) -> None:
    from PIL import Image

    photo = np.asarray(Image.open(grocery_dir / "catalogue" / "Arla-Standard-Milk.jpg").convert("RGB"))
    features = SiftExtractor().extract(photo)
    index = FaissKeypointIndex()
    index.add(1, features)
    assert _threads_in_a_new_thread(lambda: index.verify(features)) == odd_thread_count
