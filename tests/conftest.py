"""Test setup. TRITON_INTERPRET must be set before triton is first imported, so that the fused
kernels run on CPU tensors (CI has no GPU). On a machine with a GPU, set POLYAK_TEST_GPU=1 to run
the kernels compiled on the GPU instead."""

import os

if os.environ.get("POLYAK_TEST_GPU", "0") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_report_header(config):
    where = "cuda" if os.environ.get("POLYAK_TEST_GPU") == "1" else "cpu (Triton interpreter)"
    return f"polyak-fused kernels run on: {where}; torch {torch.__version__}"


@pytest.fixture
def device():
    """The device the fused kernels are tested on."""
    if os.environ.get("POLYAK_TEST_GPU") == "1":
        if not torch.cuda.is_available():
            pytest.skip("POLYAK_TEST_GPU=1 but no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")
