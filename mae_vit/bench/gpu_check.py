"""One GPU check (`tools/gpu_check.py`): what a first GPU must show, in one go, in under 8 minutes on one H100/H200.

    precision      train.mixed_precision=auto resolves to bf16
    bench_B/L      ViT-B/16 (batch 256) and ViT-L/16 (batch 128) MAE train steps, bf16: MFU >= 45% / 50%;
                   the measured peak memory beside the paper's estimate (`memory.py`)
    compile        torch.compile of the ViT-B step: compiles and is not slower than eager (>= 0.97x)
    sigterm        the demo pretraining on the GPU: SIGTERM -> exit 75 and a complete checkpoint; the same
                   command resumes and finishes; the loss falls
    time_budget    optim.time_budget=40s ends within 40 s (+15 s start-up allowance)
    fp16           fine-tuning under fp16 writes scaler.pt; resuming the bf16 pretraining checkpoint under fp16
                   works (no scaler.pt there)
    in_memory      data.in_memory=true trains within 15% of the benchmark's images/s at the same model and batch
    gpu_decode     data.gpu_decode=true skips nothing on good JPEGs; the gpu-marked tests (pixels within 2 grey
                   levels of the CPU decode while a long matmul is queued, no overwritten memory, no host sync)
    knn            tools/evaluate.py metrics=[knn] runs on the GPU
    memory_paper   the paper table of batch per GPU (runs on a CPU too)

Without CUDA the checks that need it are reported as skipped and the rest run; the JSON and Markdown
table are written either way. Each check records its status (pass | fail | skipped), what it measured
and its seconds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from mae_vit import files
from mae_vit.bench.benchmark import benchmark_train_step, device_name
from mae_vit.bench.memory import activation_bytes_per_image, fit_markdown, fit_table

ROOT = Path(__file__).resolve().parents[2]
DEMO = ["model.name=mae_vit_small_patch8", "model.img_size=64", "data.batch_size=128", "data.num_workers=4",
        "train.log_every=10", "train.vis_every=100000", "knn.every=0", "knn.vs_random=false", "online_probe=false",
        "train.trackers=[]"]


class Skip(Exception):
    """A check that cannot run here (no GPU)."""


def _tool(name: str, *argv, timeout: float = 300, env=None, wait=True):
    cmd = [sys.executable, str(ROOT / "tools" / name), *map(str, argv)]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise AssertionError(f"{name} exited {result.returncode}: {result.stderr[-1500:]}")
    return result


def _need_gpu():
    if not torch.cuda.is_available():
        raise Skip("needs a CUDA GPU")


def _shards(work: Path) -> tuple[str, str]:
    """Synthetic JPEG shards at 64 px (train 4096, val 512), written once."""
    import io

    from mae_vit.data import synthetic_samples, write_shards

    def jpegs(samples):
        for key, image, label in samples:
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=90)
            yield key, (buffer.getvalue(), "jpg"), label
    urls = []
    for split, count, seed in (("train", 4096, 0), ("val", 512, 1)):
        folder = work / "data" / split
        if not (folder / "shard-index.json").exists():
            write_shards(jpegs(synthetic_samples(count, img_size=64, seed=seed)), folder, samples_per_shard=512,
                         progress=False, num_classes=10)
        urls.append(str(folder / f"shard-{{000000..{count // 512 - 1:06d}}}.tar"))
    return urls[0], urls[1]


def check_precision(work):
    from mae_vit.train.device import auto_precision
    choice = auto_precision()
    _need_gpu()
    assert choice == "bf16", f"auto resolved to {choice} on {device_name(torch.device('cuda'))}"
    return {"auto": choice}


def _bench(name, batch, target, compile_model=False):
    _need_gpu()
    r = benchmark_train_step(name, batch_size=batch, precision="bf16", steps=10, warmup=3 if not compile_model else 5,
                             compile_model=compile_model)
    per_image, params = activation_bytes_per_image(name.replace("mae_", ""), "pretrain")
    paper = 18 * params + batch * per_image
    out = {"images_per_s": r.images_per_s, "mfu": r.mfu, "peak": r.peak_kind, "peak_memory_GiB":
           r.peak_memory_bytes / 2**30, "paper_memory_GiB": paper / 2**30}
    if target is not None:
        assert r.mfu is not None and r.mfu >= target, f"MFU {r.mfu} below {target:.0%} ({r.peak_kind})"
    return out


def check_bench_B(work):
    return _bench("mae_vit_base_patch16", 256, 0.45)


def check_bench_L(work):
    return _bench("mae_vit_large_patch16", 128, 0.50)


def check_compile(work):
    eager = _bench("mae_vit_base_patch16", 128, None)
    fast = _bench("mae_vit_base_patch16", 128, None, compile_model=True)
    ratio = fast["images_per_s"] / eager["images_per_s"]
    assert ratio >= 0.97, f"compiled {fast['images_per_s']:.0f} img/s against eager {eager['images_per_s']:.0f}"
    return {"eager_images_per_s": eager["images_per_s"], "compiled_images_per_s": fast["images_per_s"],
            "speedup": ratio}


def _first_last_loss(run: Path):
    metrics = json.loads((run / "metrics.json").read_text())
    return metrics["first_loss"], metrics["last_loss"], metrics["step"]


def check_sigterm(work):
    _need_gpu()
    train, val = _shards(work)
    run = work / "sigterm"
    argv = ["--output-dir", run, "--data", train, f"data.val={val}", *DEMO, "optim.epochs=6", "train.save_every=20",
            "train.compile=true", "train.overwrite=true"]
    proc = _tool("pretrain.py", *argv, wait=False)
    output = []
    for line in proc.stdout:  # wait for training to run (a logged step), then stop it
        output.append(line)
        if re.search(r"\d+ img/s", line):
            time.sleep(5)
            proc.send_signal(signal.SIGTERM)
            break
    output += proc.stdout.readlines()
    code = proc.wait(timeout=120)
    text = "".join(output)
    assert code == 75, f"exit {code} after SIGTERM: {text[-1500:]}"
    assert "cannot compile" not in text, "train.compile=true fell back to eager"
    complete = sorted((run / "checkpoints").glob("step_*/COMPLETE"))
    assert complete, "no complete checkpoint after SIGTERM"
    _tool("pretrain.py", *[a for a in argv if a != "train.overwrite=true"], timeout=400)
    first, last, step = _first_last_loss(run)
    assert last < first, f"loss {first} -> {last}"
    return {"stopped_at": complete[-1].parent.name, "steps": step, "first_loss": first, "last_loss": last}


def check_time_budget(work):
    _need_gpu()
    train, val = _shards(work)
    start = time.perf_counter()
    _tool("pretrain.py", "--output-dir", work / "budget", "--data", train, f"data.val={val}", *DEMO,
          "optim.epochs=1000", "optim.time_budget=40s", "train.save_every=100000", "train.overwrite=true")
    seconds = time.perf_counter() - start
    assert seconds <= 55, f"a 40 s budget took {seconds:.0f} s with start-up"
    return {"wall_s": seconds}


def check_fp16(work):
    _need_gpu()
    train, val = _shards(work)
    pre = ["--output-dir", work / "fp16_pre", "--data", train, f"data.val={val}", *DEMO]
    _tool("pretrain.py", *pre, "train.max_steps=20", "train.save_every=20", "train.overwrite=true")  # auto: bf16
    resumed = _tool("pretrain.py", *pre, "train.max_steps=30", "train.mixed_precision=fp16")
    assert "fresh GradScaler" in resumed.stderr + resumed.stdout, "the bf16 checkpoint was not resumed under fp16"
    _tool("finetune.py", "--checkpoint", work / "fp16_pre", "--output-dir", work / "fp16_ft", "--data", train,
          f"data.val={val}", "data.batch_size=128", "data.num_workers=4", "train.trackers=[]", "optim.epochs=1",
          "train.mixed_precision=fp16", "train.overwrite=true")
    scalers = list((work / "fp16_ft" / "checkpoints").glob("step_*/scaler.pt"))
    assert scalers, "fp16 fine-tuning saved no scaler.pt"
    return {"scaler_files": len(scalers), "resumed_steps": _first_last_loss(work / "fp16_pre")[2]}


def check_in_memory(work):
    _need_gpu()
    train, val = _shards(work)
    run = _tool("pretrain.py", "--output-dir", work / "memory", "--data", train, f"data.val={val}", *DEMO,
                "data.in_memory=true", "optim.epochs=8", "train.save_every=100000", "train.overwrite=true")
    rates = [float(x) for x in re.findall(r"(\d+) img/s", run.stderr + run.stdout)]
    bench = benchmark_train_step("mae_vit_small_patch8", batch_size=128, img_size=64, precision="bf16", steps=10)
    trained = max(rates[len(rates) // 2:]) if rates else 0.0  # after warm-up
    assert trained >= 0.85 * bench.images_per_s, f"in memory {trained:.0f} img/s, benchmark {bench.images_per_s:.0f}"
    return {"in_memory_images_per_s": trained, "benchmark_images_per_s": bench.images_per_s}


def check_gpu_decode(work):
    _need_gpu()
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from mae_vit.train.batches import GpuDecodeBatches
    train, _ = _shards(work)
    cfg = OmegaConf.create({"model": {"in_chans": 3}, "train": {"seed": 0}, "data": {
        "batch_size": 256, "num_workers": 4, "shuffle_buffer": 512, "crop_scale": [0.2, 1.0], "hflip": True,
        "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}})
    acc = SimpleNamespace(device=torch.device("cuda"), process_index=0, num_processes=1)
    batches = list(GpuDecodeBatches(train, cfg, accelerator=acc, img_size=64).batches(0))
    skipped = sum(b["skipped"] for b in batches)
    assert skipped == 0 and len(batches) == 16, f"{skipped} skipped, {len(batches)} batches"
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(ROOT / "tests")],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert tests.returncode == 0, tests.stdout[-1500:]
    return {"batches": len(batches), "skipped": skipped, "gpu_tests": tests.stdout.strip().splitlines()[-1]}


def check_knn(work):
    _need_gpu()
    train, val = _shards(work)
    pre = next((work / r for r in ("sigterm", "fp16_pre", "memory") if (work / r / "metrics.json").exists()), None)
    assert pre is not None, "no pretraining run to evaluate (the checks before failed)"
    _tool("evaluate.py", "--checkpoint", pre, "--data", train, f"data.val={val}", "metrics=[knn]",
          "--output-dir", work / "knn")
    metrics = json.loads((work / "knn" / "metrics.json").read_text())
    return {"knn_top1": metrics["metrics"]["knn"]["top1"]}


def check_memory_paper(work):
    rows = fit_table()
    return {"table": fit_markdown(rows)}


CHECKS = {"precision": check_precision, "bench_B": check_bench_B, "bench_L": check_bench_L,
          "compile": check_compile, "sigterm": check_sigterm, "time_budget": check_time_budget, "fp16": check_fp16,
          "in_memory": check_in_memory, "gpu_decode": check_gpu_decode, "knn": check_knn,
          "memory_paper": check_memory_paper}


def run_checks(work: Path, names=None, report=print) -> dict:
    """Run the checks `names` (all by default) with `work` as scratch; the JSON-ready result."""
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names or CHECKS:
        start = time.perf_counter()
        try:
            status, detail = "pass", CHECKS[name](work)
        except Skip as why:
            status, detail = "skipped", str(why)
        except Exception as error:  # a failed check is a result, and the others still run
            status, detail = "fail", f"{type(error).__name__}: {error}"
        rows.append({"check": name, "status": status, "detail": detail, "seconds": time.perf_counter() - start})
        report(f"{name}: {status} ({rows[-1]['seconds']:.0f} s) {str(detail)[:300]}")
    device = device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return {"kind": "gpu_check", "device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "host": os.uname().nodename, "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"GPU check on {result['device']} (torch {result['torch']}, CUDA {result['cuda']})", "",
             "| check | status | seconds | measured |", "|---|---|---|---|"]
    for r in result["rows"]:
        detail = r["detail"] if isinstance(r["detail"], str) else ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r["detail"].items() if k != "table")
        lines.append(f"| {r['check']} | {r['status']} | {r['seconds']:.0f} | {detail.replace('|', '/')} |")
    paper = next((r["detail"]["table"] for r in result["rows"] if r["check"] == "memory_paper"
                  and isinstance(r["detail"], dict)), None)
    return "\n".join(lines + (["", "Batch per GPU that fits (on paper, bf16):", "", paper] if paper else []))


def write(result: dict, output_dir: Path) -> None:
    files.write_json(output_dir / "gpu_check.json", result)
    (output_dir / "gpu_check.md").write_text(markdown(result) + "\n")
