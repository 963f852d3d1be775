"""The foreach path's passes on the CPU as compiled loops, where they can be built.

On the CPU each torch op is one pass over memory, so a step made of ``torch._foreach_*`` ops
makes one pass per op. ``cpu_loops.cpp`` makes each of a step's passes one loop over all
tensors (bench/NOTES.md, "Foreach path on the CPU"): the sums of a step in one read of the
tensors they need, the update in one read and one write. The methods' ``_foreach_<method>``
functions call them on the host and keep their ``torch._foreach_*`` form for every other case:
accelerators, tensors the loops do not take, and machines where the module cannot be built.

``for_tensors(*lists)`` gives the module when the loops take the lists (dense CPU tensors
of float32, float64, bfloat16 or float16, one dtype, shape and strides at each index: see
cpu_loops.cpp), else None.
``POLYAK_CPU_LOOPS`` chooses: ``auto`` (the default: the compiled module, or the torch ops with
one warning saying why it could not be built), ``cpp`` (the compiled module or an error) or
``torch`` (the torch ops).
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import _cpp_build

SOURCE = Path(__file__).with_name("cpu_loops.cpp")
MODULE_NAME = "_polyak_cpu_loops"
#: -O3 vectorizes the loops (-fno-math-errno: sqrt too); OpenMP is the runtime of torch's
#: intra-op threads (at::parallel_for); -march=native lets the loops use the machine's widest
#: vectors (the build is cached per CPU; on the 2-core CI machine the sums read 15-40% faster
#: than without it: bench/NOTES.md). PORTABLE_FLAGS are tried where a compiler refuses it.
FLAGS = ("-O3", "-fno-math-errno", "-fopenmp", "-march=native")
PORTABLE_FLAGS = FLAGS[:-1]

_UNSET = object()
_chosen = _UNSET


def module():
    """The compiled loops this process uses, or None (the torch ops)."""
    global _chosen
    if _chosen is _UNSET:
        _chosen = _choose(os.environ.get("POLYAK_CPU_LOOPS", "auto"))
    return _chosen


def for_tensors(*lists):
    """The compiled loops if they take these lists (the arguments of one call), else None."""
    loops = module()
    if loops is None or loops.refusal(*lists) is not None:
        return None
    return loops


def compiled():
    """The compiled module (built now if it is not cached); raises BuildError saying why not."""
    try:
        return _cpp_build.build_and_load(SOURCE, MODULE_NAME, FLAGS)
    except _cpp_build.BuildError as native:
        try:
            return _cpp_build.build_and_load(SOURCE, MODULE_NAME, PORTABLE_FLAGS)
        except _cpp_build.BuildError:
            raise native from None


def _choose(choice: str):
    return _cpp_build.choose(
        "POLYAK_CPU_LOOPS", choice, "torch", compiled, None,
        "the compiled CPU loops could not be built, so the foreach path runs on the CPU with "
        "torch._foreach_* ops: the same results, 1.6-5x slower for the methods with state "
        "(docs/paths.md). Install a C++ compiler to get them.")
