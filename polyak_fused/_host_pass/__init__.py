"""The host's per-tensor work of a fused step, in C++ where it can be built.

A step of the fused path does two things per tensor on the host (bench/NOTES.md, "Host cost"):
it reads every parameter's ``.grad`` (``grads_of_groups``), and it checks that every
parameter, gradient and state buffer is still where the launcher's tables point
(``check_tensors``). Through torch's Python bindings each ``.grad`` or ``data_ptr()`` costs
60-120 ns; read from the tensors' C++ objects, 5-15 ns.

``implementation()`` gives the module that does it:
  * the compiled ``host_pass.cpp`` (built on first use against the installed torch and cached:
    polyak_fused/_cpp_build.py), or
  * ``reference.py``, the same functions in Python: the specification, and what runs where no
    C++ compiler is found (with one warning saying why).
``POLYAK_HOST_PASS`` chooses: ``auto`` (the default, as above), ``cpp`` (the compiled module or
an error) or ``python``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import _cpp_build
from . import reference

SOURCE = Path(__file__).with_name("host_pass.cpp")
MODULE_NAME = "_polyak_host_pass"

#: Values per tensor in check_tensors' table (host_pass.cpp has the same).
ROW = reference.ROW
#: State buffers per tensor that table has room for.
MAX_BUFFERS = reference.MAX_BUFFERS

_chosen = None


def implementation():
    """The module with ``grads_of_groups`` and ``check_tensors`` this process uses."""
    global _chosen
    if _chosen is None:
        _chosen = _choose(os.environ.get("POLYAK_HOST_PASS", "auto"))
    return _chosen


def _choose(choice: str):
    return _cpp_build.choose(
        "POLYAK_HOST_PASS", choice, "python", compiled, reference,
        "the C++ host pass could not be built, so each fused step checks its tensors from "
        "Python, which costs about 1 us per tensor on the host (20-30x the C++ pass; "
        "docs/host_path.md). Install a C++ compiler, or use opt.flatten_grads(), whose step "
        "does not grow with the tensor count.")


def compiled():
    """The compiled module (built now if it is not cached); raises BuildError saying why not."""
    return _cpp_build.build_and_load(SOURCE, MODULE_NAME)
