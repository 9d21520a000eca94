import ast
import os
import re
import socket
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(2)
# tests that load a tool script in this process (runpy, importlib) find its `from _run import run_tool`; appended,
# so that an installed package of a tool's name (evaluate, benchmark, ...) still comes first
sys.path.append(str(Path(__file__).resolve().parent.parent / "tools"))


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

    script = Path(__file__).resolve().parent.parent / "tools" / name
    result = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# Tests that start other processes (a tool run as a user would, an accelerate launch, a process pool) take seconds
# each: they are marked `slow` here, so that `python -m pytest -m "not slow"` is the everyday inner loop (CI runs
# all). A whole training run inside the test process is marked by hand (`@pytest.mark.slow`).
STARTS_PROCESSES = re.compile(r"\b(tool\(|subprocess|multiprocessing|debug_launcher|Popen|sys\.executable)")


def process_starters(path: Path) -> set[str]:
    """Names of a test module's top-level functions (tests, helpers, fixtures) that start a process, directly or
    through another such function of the module that they name (a call, or a fixture asked for by argument)."""
    text = path.read_text()
    sources = {node.name: ast.get_source_segment(text, node) for node in ast.parse(text).body
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    starters = {name for name, source in sources.items() if STARTS_PROCESSES.search(source)}
    while True:
        more = {name for name, source in sources.items() if name not in starters
                and any(re.search(rf"\b{re.escape(starter)}\b", source) for starter in starters)}
        if not more:
            return starters
        starters |= more


def pytest_collection_modifyitems(config, items):
    starters: dict[Path, set[str]] = {}
    for item in items:
        path = Path(item.path)
        if path not in starters:
            starters[path] = process_starters(path)
        names = {getattr(item, "originalname", item.name), *getattr(item, "fixturenames", ())}
        if names & starters[path]:
            item.add_marker(pytest.mark.slow)
