import os
import socket

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _gpu_only(request):
    """Tests marked `gpu` skip on a machine without CUDA."""
    if request.node.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def free_port() -> int:
    """A TCP port nobody listens on now (for the rendezvous of 2-process test runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(name: str, *argv: str):
    """Run tools/<name> as a user would (a fresh interpreter); fail the test with its stderr unless it exits 0."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "tools" / name
    result = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result
