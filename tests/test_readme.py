"""Every ```python block of README.md runs, as a user would run it, in a fresh process.

A block whose first line is `# torchrun --nproc_per_node N ...` is written to a file and run
with torchrun on N CPU processes (gloo); every other block is run with `python`. A block whose
first line is `# needs: a, b` is skipped (with the reason) when one of those modules is not
installed, e.g. the framework integrations' optional packages. A block may check its own
claims with `assert`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def readme_blocks():
    text = (ROOT / "README.md").read_text()
    blocks = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(pytest.param(match.group(1), id=f"line{line}"))
    return blocks


def test_the_readme_has_python_blocks():
    assert len(readme_blocks()) >= 3


@pytest.mark.parametrize("code", readme_blocks())
def test_readme_block_runs(code, tmp_path):
    first = code.splitlines()[0]
    needs = re.match(r"# needs: (.*)", first)
    if needs:
        missing = [m.strip() for m in needs.group(1).split(",")
                   if importlib.util.find_spec(m.strip()) is None]
        if missing:
            pytest.skip(f"needs {', '.join(missing)} (the integrations extra)")
    script = tmp_path / "snippet.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)   # the snippets run as a user runs them: CPU, eager
    torchrun = re.match(r"# torchrun --nproc_per_node (\d+)", first)
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={torchrun.group(1)}", str(script)]
    else:
        cmd = [sys.executable, str(script)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"README block failed:\n{code}\n--- output ---\n" \
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
