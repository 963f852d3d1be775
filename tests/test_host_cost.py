"""The host-cost benchmark (python -m bench.host_cost) end to end, on a few steps: the kernels
compile for sm_90 and launch through Triton's real launcher against the stub driver of the shared
fakecuda harness (../shared/tools/fakecuda; CI has it). This is also the only place where the
launcher's direct calls of compiled kernels (csrc_triton.polyak_step._launch) run without a GPU:
Triton's C launcher checks the type of every argument it packs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

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


def test_host_cost_says_what_is_missing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "POLYAK_FAKECUDA"}
    run = _run("--fakecuda", str(tmp_path / "nowhere"), env=env)
    assert run.returncode != 0
    assert "needs the fakecuda harness" in run.stderr + run.stdout
    assert "fake_libcuda.c" in run.stderr + run.stdout
