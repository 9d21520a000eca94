"""The chain's report: one table of results, each with its run directory and wall time, plus curves.

Reads what the tools left in the chain's folder (each run's `metrics.json` and TensorBoard events,
`pixels.json`, `wall_time.json`) and writes `report.md`, `results.json`, `pretrain_loss.png` and
`finetune_top1.png` beside them. Nothing is recomputed: the report can be re-written at any time.

Each row says which split it was measured on: a fine-tuned or probed classifier's figure is its
test top-1, evaluated once with the weights chosen on the held-out val split ("test, chosen on
held-out val (epoch E)"); a run without a test evaluation shows its last data.val figure, so labelled.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from mae_vit.files import write_json
from mae_vit.viz.io import save_figure

CURVES = {"pretrain_loss.png": ("pretrain", "train/loss"), "finetune_top1.png": ("finetune_*", "val/top1")}


def read_json(path: str | os.PathLike) -> dict | None:
    """The JSON object in `path`, or None when the file does not exist yet."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def read_scalars(run_dir: str | os.PathLike, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one TensorBoard scalar in `run_dir/logs`, in step order (empty if none)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for events in sorted(Path(run_dir, "logs").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            points.update({e.step: e.value for e in acc.Scalars(tag)})  # a resumed run's later values win
    return sorted(points.items())


def collect(out: Path, preset: str, commands: dict[str, str] | None = None, splits: dict | None = None) -> dict:
    """Everything the report shows, as one dict (written as results.json). `splits`: the chain's image counts
    {"train", "val", "test", "seed", "source"} (val held out of the `source` training images)."""
    runs = {name: read_json(out / name / "metrics.json") for name in
            ("pretrain", "evaluate", "linprobe", "finetune_mae", "finetune_scratch")}
    seconds = read_json(out / "wall_time.json") or {}
    pixels = read_json(out / "pixels.json") or {}
    pre, enc = runs["pretrain"] or {}, (runs["evaluate"] or {}).get("metrics", {})
    versus = pre.get("vs_random") or {}
    shots = enc.get("fewshot", {}).get("shots", {})
    # the most shots that the data allowed (a class with fewer training images than shots has no figure)
    best_shot = max((n for n, r in shots.items() if r.get("mean") is not None), key=int, default="25")

    def row(what, value, run, note="", split="test"):
        return {"what": what, "top1": value, "split": split, "run": str(out / run) if run else None,
                "seconds": seconds.get(run, pixels.get("seconds") if run is None else None), "note": note}

    def trained(what, name, note=""):
        """A classifier's row: its test top-1 with the weights chosen on held-out val, else its last val top-1."""
        metrics = runs[name] or {}
        test, best = metrics.get("test"), metrics.get("best") or {}
        if test is not None:
            epoch = test.get("chosen_by", "").rpartition(" ")[2]
            split = f"test, chosen on held-out val (epoch {epoch})" if best else "test, last weights (no val)"
            if best:
                note = "; ".join(n for n in (note, f"held-out val top-1 {_fmt(best.get('top1'))}") if n)
            return {**row(what, test["top1"], name, note), "split": split, "val_top1": best.get("top1")}
        return {**row(what, (metrics.get("final") or {}).get("top1"), name, note), "split": "data.val, last epoch",
                "val_top1": best.get("top1")}

    val = "held-out val" if splits else "data.val"  # pretraining's data.val: held out since the chain has splits

    rows = [
        row("kNN on raw pixels (k=20, cosine)", pixels.get("knn"), None),
        row("logistic regression on raw pixels", pixels.get("logistic"), None),
        row("kNN, encoder at random init", versus.get("random_init"), "pretrain",
            f"the MAE encoder on the same split and kNN: {_fmt(versus.get('pretrained'))}", split=val),
        row("kNN, MAE encoder (frozen)", (enc.get("knn") or {}).get("top1"), "evaluate"),
        row(f"{best_shot}-shot linear, MAE encoder", (shots.get(best_shot) or {}).get("mean"), "evaluate",
            "ridge regression, mean of %s draws" % enc.get("fewshot", {}).get("draws")),
        trained("linear probe, MAE encoder (frozen)", "linprobe"),
        trained("fine-tuned from scratch", "finetune_scratch"),
        trained("fine-tuned from the MAE weights", "finetune_mae", "same recipe and budget as scratch"),
    ]
    return {"preset": preset, "machine": machine(), "splits": splits, "rows": rows,
            "pretrain_loss": [pre.get("first_loss"),
            pre.get("last_loss")], "seconds": seconds, "commands": commands or {}, "runs": runs, "pixels": pixels}


def machine() -> str:
    """CPU model and cores, or the GPU, in words."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (1 GPU), {os.cpu_count()} CPU cores"
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores, no GPU"


def _fmt(value, digits=1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot_curves(out: Path, val: str = "data.val") -> list[str]:
    """The pretraining loss per step and the fine-tuning top-1 per epoch (MAE vs scratch) on `val` (the split's
    name for the axis), as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, (pattern, tag) in CURVES.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for run in sorted(p for p in out.glob(pattern) if p.is_dir()):
            points = read_scalars(run, tag)
            final = ((read_json(run / "metrics.json") or {}).get("final") or {})
            per_epoch = final.get("epoch", 0) / final["step"] if final.get("step") else None
            xs = [s * per_epoch for s, _ in points] if per_epoch else [s for s, _ in points]
            ax.plot(xs, [v for _, v in points], marker="o" if per_epoch else None, label=run.name)
        ax.set_xlabel("epoch" if tag == "val/top1" else "optimizer step")
        ax.set_ylabel(f"{val} top-1 (%)" if tag == "val/top1" else "loss (norm-pix MSE on masked patches)")
        ax.grid(alpha=0.3)
        ax.legend()
        save_figure(fig, out / name)
        plt.close(fig)
        written.append(name)
    return written


def splits_text(splits: dict | None) -> str:
    """Which split chose what, in words, for the report."""
    if not splits:
        return ("Splits: the runs' data.val chose their best checkpoint and is where their figures come from "
                "(no held-out split recorded).")
    return (f"Splits: held-out val = {splits['val']:,} of the {splits['source']:,} training images (seed "
            f"{splits['seed']}), never trained on; the models train on {splits['train']:,} others; test = the "
            f"{splits['test']:,} test images. Every choice is made on held-out val: the checkpoint that fine-tuning "
            "and the linear probe call best (its epoch is in the table), pretraining's kNN monitor and online probe. "
            "The test split is evaluated once per run, at the end, with the weights chosen on held-out val. The "
            "frozen encoder's kNN / few-shot and the raw-pixel baselines choose nothing: fit on the training part, "
            "scored on test.")


def write_report(out: str | os.PathLike, *, preset: str, commands: dict[str, str] | None = None,
                 splits: dict | None = None) -> Path:
    """Write report.md, results.json and the curves into `out`; returns the path of report.md. `splits`: the
    chain's image counts (see `collect`)."""
    out = Path(out)
    results = collect(out, preset, commands, splits)
    results["figures"] = plot_curves(out, "held-out val" if splits else "data.val")
    write_json(out / "results.json", results)
    total = sum(results["seconds"].values()) + (results["pixels"].get("seconds") or 0)
    lines = [f"# Fashion-MNIST, preset `{preset}`", "",
             f"Machine: {results['machine']}. Total wall time {total / 60:.1f} min.", "", splits_text(splits), "",
             "| what | top-1 (%) | measured on | wall time | run directory | note |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['what']} | {_fmt(r['top1'])} | {r['split']} | {_fmt(r['seconds'] and r['seconds'] / 60)} "
                     f"min | {r['run'] or '-'} | {r['note']} |")
    first, last = results["pretrain_loss"]
    lines += ["", f"MAE pretraining loss {_fmt(first, 3)} -> {_fmt(last, 3)}.", "",
              "![pretraining loss](pretrain_loss.png) ![fine-tuning top-1](finetune_top1.png)", "", "## Commands", ""]
    lines += [f"- {name}: `{cmd}`" for name, cmd in results["commands"].items()]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
