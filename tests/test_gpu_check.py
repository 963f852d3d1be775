"""python -m bench.gpu_check, the command for the GPU proof, on the CPU: its plan, and its whole
pipeline with --allow-cpu on the GPU-only tests (which skip here), so that the command works on
the day a GPU is available. What it checks on a GPU is in the tests it runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def _run(*args):
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_the_plan_lists_every_part_within_ten_minutes():
    run = _run("--dry-run")
    assert run.returncode == 0, run.stderr
    for part in gpu_check.PARTS:
        assert part in run.stdout
    assert sum(limit for _, _, limit in gpu_check.PARTS.values()) <= 600


def test_without_a_gpu_it_says_so():
    run = _run("--parts", "gpu_only")
    assert run.returncode == 2 and "no CUDA device" in run.stderr


def test_the_pipeline_runs_and_writes_its_results(tmp_path):
    run = _run("--allow-cpu", "--parts", "gpu_only", "--out", str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["torch"] and env["gpu"] is None and env["date"]
    summary = (tmp_path / "summary.md").read_text()
    row = next(line for line in summary.splitlines() if line.startswith("| gpu_only"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    passed, failed, errors, skipped = map(int, cells[3:7])
    assert (passed, failed, errors) == (0, 0, 0) and skipped >= 20   # every GPU-only test
    assert "pytest" in (tmp_path / "gpu_only.log").read_text()
