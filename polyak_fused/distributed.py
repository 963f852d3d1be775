"""Distributed reduction of the step's global scalars (filled in by the distributed issue).

`current_reduction()` returns None in a single process: nothing is communicated."""

from __future__ import annotations

_ACTIVE = None


def current_reduction():
    return _ACTIVE
