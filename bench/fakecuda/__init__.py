"""Triton's real GPU launch path on a machine without a GPU: kernels compiled for an NVIDIA target
by Triton's own ptxas, launched through Triton's own C launcher, against a stub CUDA driver.

What runs as on a GPU host: compiling each kernel variant to a cubin (sm_90 by default),
``JITFunction.run`` (binding, specialisation, the variant cache), the compiled kernel's runner,
Triton's C argument packing (its type checks and ``cuPointerGetAttribute`` per pointer), and
everything the library's launcher does. What does not: the kernels themselves (nothing runs on a
device; the tensors stay in host memory and their addresses go to the stub, which never reads
them) and the real driver's few microseconds per launch.

Pieces:
  * ``stub_libcuda.c``: the stub ``libcuda.so.1`` (two devices, a current context per device,
    distinct module and function handles, and a record of every launch: function, grid, block,
    stream, the device current at the launch, the bytes of each parameter).
  * this module: builds the stub (once per source and Triton version, in the temp folder),
    loads it before Triton's C modules, so that they bind to it, and installs a Triton driver
    that reports ``devices`` sm_90 devices, a distinct current stream per device, and records
    each launch's Python arguments too.

Use, in a process where Triton kernels are real JITFunctions (no ``TRITON_INTERPRET=1``):

    from bench import fakecuda
    harness = fakecuda.install()          # before the first launch
    ...                                   # launches
    for launch in harness.launches():     # function, grid, stream, device, args, params
        ...

Written for the generic C launcher of Triton 3.9 (``CudaUtils.launch``); ``install`` raises
``fakecuda.Unsupported`` with the reason where that, a C compiler or ptxas is missing.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "stub_libcuda.c"
#: As in stub_libcuda.c.
DEVICES, RECORDS, MAX_PARAMS, PARAM_BYTES = 2, 4096, 64, 1024
#: The stream handle the fake driver reports as current on device d (never 0, so that a launch
#: on the default stream of a device cannot pass for one on its current stream).
STREAM_BASE = 0x5000
#: Triton 3.9's extractor codes (driver.c, ExtractorTypeIndex) and the size of each.
_CODE_SIZES = {1: 8, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 2, 8: 4, 9: 8, 10: 2, 11: 2, 12: 4, 13: 8}


class Unsupported(RuntimeError):
    """The harness cannot run here; the message says why (tests skip with it)."""


class _Record(ctypes.Structure):
    _fields_ = [("function", ctypes.c_uint64), ("grid", ctypes.c_uint32 * 3),
                ("block", ctypes.c_uint32 * 3), ("stream", ctypes.c_uint64),
                ("device", ctypes.c_int32), ("n_params", ctypes.c_int32),
                ("offsets", ctypes.c_int32 * MAX_PARAMS), ("sizes", ctypes.c_int32 * MAX_PARAMS),
                ("bytes", ctypes.c_uint8 * PARAM_BYTES)]


@dataclass
class Launch:
    """One launch as the stub driver saw it (``params``: each kernel parameter's raw bytes, the
    two scratch pointers Triton appends included) and as the launcher was called (``args``: the
    Python value of every argument of the kernel, constexprs included, in its parameter
    order)."""

    function: int
    grid: tuple
    block: tuple
    stream: int
    device: int
    params: list
    args: tuple

    def param_as_int(self, i: int) -> int:
        raw = self.params[i]
        return int.from_bytes(raw, "little", signed=len(raw) == 8 and raw[-1] >= 0x80)

    def param_as_float(self, i: int) -> float:
        return struct.unpack("<f", self.params[i])[0]


def stream_of(device: int) -> int:
    return STREAM_BASE + device


def _triton_include() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "include"


def build() -> Path:
    """Compile the stub (cached by its source and the Triton version); returns its folder."""
    import triton

    digest = hashlib.sha256(SOURCE.read_bytes() + triton.__version__.encode()).hexdigest()[:16]
    out_dir = Path(tempfile.gettempdir()) / f"polyak_fakecuda_{digest}"
    lib = out_dir / "libcuda.so.1"
    if lib.is_file():
        return out_dir
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise Unsupported("no C compiler (cc or gcc, or $CC) to build the stub libcuda.so.1")
    include = _triton_include()
    if not (include / "cuda.h").is_file():
        raise Unsupported(f"Triton's cuda.h is not in {include} (Triton without its NVIDIA "
                          f"backend?)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"libcuda.so.1.{os.getpid()}"
    run = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1",
                          f"-I{include}", str(SOURCE), "-o", str(tmp)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise Unsupported(f"the stub libcuda.so.1 did not compile: {run.stderr[-2000:]}")
    shutil.copy(tmp, out_dir / "libcuda.so")   # the name the linker looks for (-lcuda)
    tmp.replace(lib)                           # last: its presence means the build is complete
    return out_dir


class Harness:
    """The installed fake driver: its launches and the stub's state."""

    def __init__(self, stub: ctypes.CDLL, driver):
        self.stub, self.driver = stub, driver
        self._records = (_Record * RECORDS).in_dll(stub, "stub_launches")
        self._count = ctypes.c_longlong.in_dll(stub, "stub_n_launches")

    def n_launches(self) -> int:
        return self._count.value

    def launches(self) -> list[Launch]:
        """Every launch since the last reset (at most RECORDS), oldest first."""
        n = self._count.value
        if n > RECORDS:
            raise RuntimeError(f"{n} launches since the last reset; the stub keeps {RECORDS}")
        out = []
        for i in range(n):
            r = self._records[i]
            raw = bytes(r.bytes)
            params = ([raw[r.offsets[k]:r.offsets[k] + r.sizes[k]] for k in range(r.n_params)]
                      if r.n_params >= 0 else None)
            out.append(Launch(r.function, tuple(r.grid), tuple(r.block), r.stream, r.device,
                              params, self.driver.python_args[i] if i < len(
                                  self.driver.python_args) else None))
        return out

    def reset(self) -> None:
        self.stub.stub_reset()
        self.driver.python_args.clear()


_HARNESS: Harness | None = None


def install(arch: int = 90, record: bool = True) -> Harness:
    """Load the stub and make it Triton's active driver (once per process). `record`: also keep
    each launch's Python arguments and the bytes of its parameters (tests); False leaves
    Triton's launch call as it is, for timing (the stub still counts launches)."""
    global _HARNESS
    if _HARNESS is not None:
        return _HARNESS
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise Unsupported("TRITON_INTERPRET=1: the kernels are interpreted, there is no launch "
                          "to stub (run in a process without it)")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia import driver as nvd
    except ImportError as e:
        raise Unsupported(f"Triton with its NVIDIA backend is not importable: {e}") from e
    if not hasattr(nvd, "CudaLauncher"):
        raise Unsupported(f"Triton {triton.__version__}: no CudaLauncher")
    stub_dir = build()
    os.environ["TRITON_LIBCUDA_PATH"] = str(stub_dir)  # where Triton links its C modules
    # Loaded first, under its soname: Triton's C modules, which need libcuda.so.1, bind to it.
    stub = ctypes.CDLL(str(stub_dir / "libcuda.so.1"), mode=ctypes.RTLD_GLOBAL)
    stub.stub_expect.argtypes = (ctypes.c_int, ctypes.POINTER(ctypes.c_int32))
    utils = nvd.CudaUtils()
    if not hasattr(utils, "launch") or not hasattr(utils, "build_signature_metadata"):
        raise Unsupported(f"Triton {triton.__version__} has no generic C launcher "
                          f"(CudaUtils.launch); this harness is written for Triton 3.9")
    code_of = {t: utils.build_signature_metadata([t])[0] for t in ("*fp32", "i32", "i64", "fp32")}
    if code_of != {"*fp32": 1, "i32": 4, "i64": 5, "fp32": 12}:
        raise Unsupported(f"Triton {triton.__version__}: unknown argument codes {code_of}")

    class _Utils:
        """Triton's CudaUtils (its C module, bound to the stub), with each launch recorded."""

        def __init__(self):
            if not record:
                self.launch = utils.launch

        def __getattr__(self, name):
            return getattr(utils, name)

        def launch(self, *a):
            # (gridX, gridY, gridZ, stream, function, coop, pdl, metadata, launch_metadata,
            #  enter hook, exit hook, global scratch, profile scratch, annotations, signature,
            #  kernel args): what CudaLauncher.__call__ passes
            signature, kernel_args = a[-2], a[-1]
            sizes = [_CODE_SIZES.get(code, -1) for code in bytes(signature)] + [8, 8]
            array = (ctypes.c_int32 * len(sizes))(*sizes)
            stub.stub_expect(len(sizes), array)
            fake.python_args.append(tuple(kernel_args))
            return utils.launch(*a)

        def get_device_properties(self, device):
            return {**utils.get_device_properties(device), "max_shared_mem": 232448}

    class FakeCudaDriver(nvd.CudaDriver):
        """Triton's CUDA driver over the stub: `devices` devices of compute capability `arch`;
        the current device is the stub's current context (so set_current_device works as on a
        GPU machine), and each device's current stream is STREAM_BASE + device."""

        def __init__(self):
            self.utils = _Utils()
            self.launcher_cls = nvd.CudaLauncher
            self.python_args: list = []
            self.get_current_device = utils.get_current_device
            self.set_current_device = utils.set_current_device
            self.get_current_stream = lambda device=None: stream_of(
                utils.get_current_device() if device is None else device)
            self.get_device_capability = lambda device=None: (arch // 10, arch % 10)

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            import torch
            return torch.device("cpu")

        def is_active(self):
            return True

    if shutil.which("ptxas") is None and not (Path(triton.__file__).parent / "backends" /
                                              "nvidia" / "bin" / "ptxas").is_file():
        raise Unsupported("ptxas is missing (Triton ships it in backends/nvidia/bin)")
    fake = FakeCudaDriver()
    triton.runtime.driver.set_active(fake)
    _HARNESS = Harness(stub, fake)
    return _HARNESS
