"""The host-cost benchmark (python -m bench.host_cost) end to end, on a few steps: the kernels
compile for sm_90 and launch through Triton's real launcher against the project's stub driver
(bench.fakecuda). What each launch receives is checked in tests/test_gpu_launch.py."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from bench import host_cost

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "bench.host_cost", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_host_cost_benchmark_runs_and_makes_its_table(tmp_path):
    out = tmp_path / "host_cost.csv"
    run = _run("--tensors", "3,148", "--steps", "5", "--warmup", "2", "--out", str(out))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["tensors"], r["scenario"]) for r in rows} == {
        (n, s) for n in ("3", "148") for s in host_cost.SCENARIOS}
    for r in rows:
        assert float(r["median_ms"]) > 0
        assert float(r["launches_per_step"]) == 3.0, r   # reduce, step size, update: one group
        assert r["launch_path"] == "compiled kernel", r  # the direct launches ran
        assert r["harness"].startswith("fakecuda") and r["load_start"] and r["git_sha"]
    assert {r["layout"] for r in rows} == {"3x64", "gpt2_small"}
    table = host_cost.table([out])
    assert "| 148 | same_grads |" in table and "| 3 | flat_grads |" in table
    assert "Conditions:" in table and "load average" in table


def test_the_stub_driver_says_why_it_cannot_run():
    """Under the interpreter (this process: tests/conftest.py) there is no launch to stub; the
    harness says so rather than launching nothing silently (tests skip with its reason)."""
    from bench import fakecuda

    with pytest.raises(fakecuda.Unsupported, match="TRITON_INTERPRET=1"):
        fakecuda.install()
