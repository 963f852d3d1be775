"""What `pip install` puts into site-packages, and what the source distribution carries: the wheel's
only top-level package is polyak_fused (the kernels and the host pass are its subpackages, the C++
source of the host pass inside), its license metadata is in the current (SPDX) form, and the sdist
holds everything its tests need (tests/, their helpers and data, bench/, the README and docs/ pages whose examples they run)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _source_tree(dest: Path) -> Path:
    """The files a clone has (git's tracked and unignored ones), copied, so that the build
    neither sees nor leaves anything in the checkout."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True)
    if files.returncode != 0:  # not a git checkout (e.g. an unpacked sdist): all but the venv
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".venv", "__pycache__"))
        return dest
    for name in files.stdout.splitlines():
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    src = _source_tree(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("dist")
    built = []
    for kind in ("wheel", "sdist"):  # one process each (setuptools keeps state between them)
        code = (f"import sys; from setuptools import build_meta as b; "
                f"print('BUILT', b.build_{kind}(sys.argv[1]))")
        done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        built.append(next(line for line in done.stdout.splitlines()
                          if line.startswith("BUILT ")).split()[1])
    wheel, sdist = built
    return out / wheel, out / sdist


def test_the_wheel_installs_one_top_level_package(built):
    wheel, _ = built
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"polyak_fused"}, sorted(top)
    assert "polyak_fused/_host_pass/host_pass.cpp" in names
    assert "polyak_fused/_kernels/polyak_step.py" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "License-Expression: MIT" in text


def test_the_sdist_holds_what_its_tests_need(built):
    _, sdist = built
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for needed in ("tests/conftest.py", "tests/helpers.py", "tests/eager_helpers.py",
                   "tests/data/old_checkpoint_e9a6c3b.pt", "bench/layouts.py",
                   "bench/fakecuda/stub_libcuda.c", "bench/fakecuda/__init__.py",
                   "README.md", "docs/usage.md", "LICENSE", "pyproject.toml",
                   "polyak_fused/_host_pass/host_pass.cpp"):
        assert needed in names, needed
    assert not any("__pycache__" in n for n in names)
