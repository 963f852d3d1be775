"""Compile the package's C++ modules against the installed torch on first use, and keep them.

Two modules are built this way: the fused path's host pass (``_host_pass/host_pass.cpp``) and
the foreach path's CPU loops (``_cpu_loops/cpu_loops.cpp``). Each is built once per (source,
flags, torch build, Python, compiler; and CPU, for a -march=native build) and cached as a
shared library in ``$POLYAK_FUSED_CACHE`` (default ``$XDG_CACHE_HOME/polyak_fused``, else
``~/.cache/polyak_fused``); later processes load it in milliseconds. A build takes 10-35 s
on a 2-core machine and needs a C++ compiler (``$CXX``, else ``c++``, ``g++`` or ``clang++``) and
the Python headers, which Triton itself needs (it compiles its launcher in C). Processes that
start together (the ranks of a torchrun job) take a file lock, so one of them compiles and the
others load its result. `choose` reads the environment variable that picks a compiled module or
its fallback, the same way for both.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

import torch


class BuildError(RuntimeError):
    """Why a C++ module could not be built or loaded (the message says what is missing)."""


def cache_dir() -> Path:
    explicit = os.environ.get("POLYAK_FUSED_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "polyak_fused"


def compiler() -> str:
    explicit = os.environ.get("CXX")
    if explicit:
        return explicit
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    raise BuildError("no C++ compiler found (set CXX, or install g++ or clang++)")


def _commands(cxx: str, source: Path, flags: tuple, out: Path) -> list[list[str]]:
    """The compile commands to try, in order: C++20 (what torch >= 2.10 builds with), then
    C++17 (older compilers)."""
    torch_dir = Path(torch.__file__).parent
    python_include = sysconfig.get_paths()["include"]
    if not Path(python_include, "Python.h").exists():
        raise BuildError(f"the Python headers are missing ({python_include}/Python.h); install "
                         f"the python3-dev package of this Python")
    lib = torch_dir / "lib"
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    common = ["-shared", "-fPIC", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *flags,
              f"-I{torch_dir / 'include'}", f"-I{python_include}", str(source), "-o", str(out),
              f"-L{lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python",
              f"-Wl,-rpath,{lib}"]
    return [[cxx, f"-std={std}", *common] for std in ("c++20", "c++17")]


def cpu_features() -> str:
    """What the machine's CPU offers, for a module built with -march=native: the "flags" (x86)
    or "Features" (Arm) line of /proc/cpuinfo and the machine type, so that a cache shared by
    different machines (a home folder on a cluster) never gives one another's build."""
    found = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("flags", "Features"):
                    found = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {found}"


def _key(cxx: str, source: Path, flags: tuple) -> str:
    native = any(f.startswith(("-march=native", "-mcpu=native")) for f in flags)
    parts = [source.read_bytes(), " ".join(flags).encode(),
             (cpu_features() if native else "").encode(), torch.__version__.encode(),
             str(getattr(torch.version, "git_version", "")).encode(), sys.version.encode(),
             str(sysconfig.get_config_var("EXT_SUFFIX")).encode(), cxx.encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]


def _load(name: str, path: Path):
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def choose(variable: str, choice: str, off: str, build, fallback, cost: str):
    """The module the environment variable `variable` chooses (its value `choice`): "auto"
    `build()`, or where that fails `fallback` with one RuntimeWarning that says what this costs
    (`cost`) and why; "cpp" `build()` or its error; `off` the fallback, silently."""
    if choice == off:
        return fallback
    if choice not in ("auto", "cpp"):
        raise ValueError(f"Invalid {variable}: {choice!r} (expected auto, cpp or {off})")
    try:
        return build()
    except (ImportError, OSError, RuntimeError) as e:  # BuildError is a RuntimeError
        if choice == "cpp":
            raise
        warnings.warn(f"polyak_fused: {cost} Reason: {e}. ({variable}={off} silences this "
                      f"warning.)", RuntimeWarning, stacklevel=4)
        return fallback


def build_and_load(source: Path, name: str, flags: tuple = ("-O2",)):
    """The module `name` compiled from `source` with `flags`, from the cache or built now.
    Raises BuildError saying why not."""
    cxx = compiler()
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"cannot create the cache folder {folder}: {e}") from None
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = folder / f"{source.stem}_{_key(cxx, source, flags)}{suffix}"
    if not target.exists():
        import fcntl  # (POSIX only: on Windows the ImportError sends callers to their fallback)

        with open(folder / "build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process builds, the others wait and load
            if not target.exists():
                _compile(cxx, source, flags, target)
    try:
        return _load(name, target)
    except ImportError as e:
        raise BuildError(f"the compiled module {target} does not load: {e}") from None


def _compile(cxx: str, source: Path, flags: tuple, target: Path) -> None:
    errors = []
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        for command in _commands(cxx, source, flags, out):
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise BuildError(f"the C++ compiler {cxx} did not run: {e}") from None
            if done.returncode == 0:
                os.replace(out, target)  # atomic: a reader sees no half-written file
                return
            errors.append(f"$ {' '.join(command)}\n{done.stderr.strip()[-2000:]}")
    raise BuildError(f"compiling {source.name} failed:\n" + "\n".join(errors))
