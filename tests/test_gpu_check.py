"""tools/gpu_check.py on a machine without a GPU: what it can run passes, the GPU-only checks say skipped."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mae_vit.bench import gpu_check

TOOL = Path(__file__).resolve().parent.parent / "tools" / "gpu_check.py"
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")


@cpu_only
def test_without_a_gpu_every_gpu_check_is_skipped_and_the_paper_table_is_there(tmp_path):
    result = gpu_check.run_checks(tmp_path, report=lambda _: None)
    status = {r["check"]: r["status"] for r in result["rows"]}
    assert list(status) == list(gpu_check.CHECKS)
    assert status.pop("memory_paper") == "pass" and set(status.values()) == {"skipped"}
    table = gpu_check.markdown(result)
    assert "| bench_L | skipped | 0 | needs a CUDA GPU |" in table
    assert "| ViT-H/14 | finetune |" in table and result["device"].startswith("cpu")


@cpu_only
@pytest.mark.slow
def test_the_tool_writes_its_json_and_table_and_refuses_an_unknown_check(tmp_path):
    run = subprocess.run([sys.executable, str(TOOL), "--output-dir", str(tmp_path), "--checks",
                          "precision,memory_paper,bench_B"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["status"] for r in saved["rows"]] == ["skipped", "pass", "skipped"]
    assert (tmp_path / "gpu_check.md").read_text().startswith("GPU check on cpu")
    bad = subprocess.run([sys.executable, str(TOOL), "--checks", "nonsense"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "no check named nonsense" in bad.stderr
