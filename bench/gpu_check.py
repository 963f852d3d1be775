"""The GPU proof in one command: on a machine with one NVIDIA GPU (an H100 or H200: under 10
minutes), everything that only a GPU can check, with the results written for committing.

    python -m bench.gpu_check                    # all parts, into bench/results/gpu_check_<gpu>_<date>/
    python -m bench.gpu_check --dry-run          # print the plan (any machine)
    python -m bench.gpu_check --parts parity     # some parts (comma list, of PARTS)

Parts, each a child process with its own time limit (a part that fails or runs out of time is
reported and the next one runs):
  gpu_only        the GPU-only tests (`pytest -m gpu_only`): no host sync in step(), CUDA-graph
                  replay, a tensor of more than 2^31 elements (where memory allows), no compile
                  after the first step, the current stream, a second GPU (if there is one), one
                  host-to-device copy and no allocation per new-gradient step, GradScaler
  parity          every method against the float64 reference with the kernels compiled for this
                  GPU, in float32, bfloat16, float16 and mixed models (tests/test_parity.py),
                  parameters without a gradient (tests/test_no_grad.py), the fused engine's
                  properties (tests/test_fused_engine.py)
  step_benchmark  `python -m bench.step_benchmark --device cuda --quick`: every optimizer's step
                  against torch's and the bandwidth floor
  host_cost       `python -m bench.host_cost --device cuda`: the host time of a step with the
                  real driver
The folder gets `summary.md` (a table of the parts: status, tests passed/failed/skipped, time),
`environment.json` (GPU, compute capability, driver, CUDA, torch, Triton, Python, commit,
date), each part's log, the tests' JUnit XML and the benchmarks' CSVs.

Without a CUDA device the command stops with a message (`--allow-cpu` runs the parts anyway:
the GPU-only tests then skip; the CI runs that, to keep this command working).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PY = sys.executable

#: name -> (what it checks, command, seconds allowed on an H100/H200: 590 in all)
PARTS = {
    "gpu_only": ("the GPU-only tests",
                 [PY, "-m", "pytest", "-q", "-m", "gpu_only", "-p", "no:cacheprovider",
                  "--junitxml={out}/gpu_only.xml"], 150),
    "parity": ("every method against the float64 reference on the GPU",
               [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_parity.py",
                "tests/test_no_grad.py", "tests/test_fused_engine.py",
                "--junitxml={out}/parity.xml"], 240),
    "step_benchmark": ("the step benchmark against torch and the floor",
                       [PY, "-m", "bench.step_benchmark", "--device", "cuda", "--quick",
                        "--budget-s", "90", "--out", "{out}/step_cuda.csv"], 130),
    "host_cost": ("the host cost of a step with the real driver",
                  [PY, "-m", "bench.host_cost", "--device", "cuda", "--tensors", "148,2000",
                   "--steps", "200", "--out", "{out}/host_cost_cuda.csv"], 70),
}


def environment() -> dict:
    import torch

    info = {"date": _dt.datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "host": platform.node()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"sm_{props.major}{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpus=torch.cuda.device_count(), sms=props.multi_processor_count)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
        except (OSError, IndexError):
            info["driver"] = None
    else:
        info.update(gpu=None, capability=None, gpus=0)
    try:
        info["git_sha"] = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                                         capture_output=True, text=True).stdout.strip() or None
    except OSError:
        info["git_sha"] = None
    return info


def junit_counts(path: Path) -> dict | None:
    """passed / failed / skipped / errors of a pytest JUnit XML file (None if there is none)."""
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors",
                                                              "skipped")}
    return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"]}


def _text(output) -> str:
    """A child's output as text (TimeoutExpired keeps bytes even with text=True)."""
    if output is None:
        return ""
    return output.decode(errors="replace") if isinstance(output, bytes) else output


def run_part(name: str, out: Path, scale: float) -> dict:
    what, command, limit = PARTS[name]
    command = [c.format(out=out) for c in command]
    env = {**os.environ, "POLYAK_TEST_GPU": "1"}
    env.pop("TRITON_INTERPRET", None)
    log = out / f"{name}.log"
    start = time.monotonic()
    try:
        run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=limit * scale)
        status = "ok" if run.returncode == 0 else f"failed (exit {run.returncode})"
        text = run.stdout + run.stderr
    except subprocess.TimeoutExpired as e:
        status = f"timed out after {limit * scale:.0f} s"
        text = _text(e.stdout) + _text(e.stderr)
    log.write_text(f"$ {' '.join(command)}\n{text}")
    row = {"part": name, "checks": what, "status": status,
           "seconds": round(time.monotonic() - start, 1)}
    counts = junit_counts(out / f"{name}.xml")
    if counts is not None:
        row.update(counts)
    return row


def summary_table(rows: list, env: dict) -> str:
    lines = [f"# GPU check: {env.get('gpu') or 'no GPU'} ({env.get('capability')}), "
             f"{env['date']}", "",
             f"torch {env['torch']} (CUDA {env.get('cuda')}), Triton {env.get('triton')}, "
             f"Python {env['python']}, driver {env.get('driver')}, commit {env.get('git_sha')}",
             "", "| part | checks | status | passed | failed | errors | skipped | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        counts = " | ".join(str(r.get(k, "")) for k in ("passed", "failed", "errors", "skipped"))
        lines.append(f"| {r['part']} | {r['checks']} | {r['status']} | {counts} | "
                     f"{r['seconds']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help="comma list of " + ", ".join(PARTS))
    ap.add_argument("--out", type=Path, default=None,
                    help="folder (default bench/results/gpu_check_<gpu>_<date>)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="run without a CUDA device (the GPU-only tests skip)")
    ap.add_argument("--time-scale", type=float, default=1.0,
                    help="multiply every part's time limit (default 1: an H100/H200)")
    a = ap.parse_args(argv)
    a.parts = [p for p in a.parts.split(",") if p]
    for p in a.parts:
        if p not in PARTS:
            ap.error(f"Invalid part: {p!r} (known: {', '.join(PARTS)})")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.dry_run:
        total = sum(PARTS[p][2] for p in a.parts)
        for p in a.parts:
            what, command, limit = PARTS[p]
            print(f"{p:<15} {limit:>4} s  {what}\n{'':<22}{' '.join(command)}")
        print(f"at most {total / 60:.1f} min")
        return 0
    import torch

    if not torch.cuda.is_available() and not a.allow_cpu:
        print("bench.gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it "
              "on a GPU machine, or pass --allow-cpu to try the pipeline", file=sys.stderr)
        return 2
    env = environment()
    slug = re.sub(r"[^a-z0-9]+", "_", (env.get("gpu") or "cpu").lower()).strip("_")
    out = a.out or RESULTS / f"gpu_check_{slug}_{_dt.date.today().isoformat()}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "environment.json").write_text(json.dumps(env, indent=2) + "\n")
    rows = []
    for p in a.parts:
        print(f"# {p}: {PARTS[p][0]} ...", flush=True)
        rows.append(run_part(p, out, a.time_scale))
        print(f"  {rows[-1]['status']} in {rows[-1]['seconds']} s", flush=True)
    (out / "summary.md").write_text(summary_table(rows, env))
    print(f"wrote {out}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
