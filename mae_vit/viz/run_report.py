"""A Markdown report of training runs: where each came from, what it reached, and its curves.

`write_run_report([runs/pretrain, runs/finetune], out)` reads what the tools leave in each run
directory (`lineage.json`, `metrics.json`, TensorBoard events) and writes `out/report.md` with one
section per run and a PNG of its curves beside it. Nothing is recomputed.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from matplotlib.figure import Figure

from mae_vit.files import write_text
from mae_vit.viz.io import save_figure
from mae_vit.viz.report import read_json, read_scalars

CURVES = ("train/loss", "train/lr", "train/images_per_s", "val/top1", "val/knn_top1", "val/online_probe_top1")


def lineage_chain(run: Path, depth: int = 10) -> list[str]:
    """`run` and its ancestors as lines: each with the parent checkpoint it started from and that file's sha256,
    and a note when the file now has another sha256 (or is gone)."""
    lines = []
    for _ in range(depth):
        record = read_json(run / "lineage.json")
        if record is None:
            lines.append(f"`{run}` (no lineage.json: made before lineage was recorded, or not a run)")
            break
        parent = record.get("parent")
        if parent is None:
            lines.append(f"`{run}` ({record['task']}, from scratch)")
            break
        lines.append(f"`{run}` ({record['task']}) <- `{parent['path']}` (sha256 `{parent['sha256']}`"
                     f"{_parent_now(parent)})")
        if not parent.get("run"):
            break
        run = Path(parent["run"])
    return lines


def _parent_now(parent: dict) -> str:
    """'' when the parent file still has the recorded sha256; else a note saying how it differs now."""
    path = Path(parent["path"])
    if not path.is_file():
        return "; the file is no longer there"
    with open(path, "rb") as f:
        now = hashlib.file_digest(f, "sha256").hexdigest()
    if now == parent["sha256"]:
        return ""
    return (f"; changed since: the file's sha256 is now `{now}` (its run went on, or it was replaced, after this "
            "run started from it)")


def plot_run(run: Path) -> Figure | None:
    """One panel per curve the run logged (loss, lr, throughput, validation metrics); None when it logged none."""
    found = [(tag, read_scalars(run, tag)) for tag in CURVES]
    found = [(tag, points) for tag, points in found if points]
    if not found:
        return None
    fig = Figure(figsize=(3.2 * len(found), 2.8))
    for i, (tag, points) in enumerate(found):
        ax = fig.add_subplot(1, len(found), i + 1)
        ax.plot([p[0] for p in points], [p[1] for p in points], "-" if len(points) > 20 else "o-")
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _resumes(resumes: list[dict]) -> list[str]:
    """A line saying how often the run resumed and what its last resume changed (lineage's `resumes`)."""
    if not resumes:
        return []
    last = resumes[-1]
    changed = ", ".join(f"`{k}` {a} -> {b}" for k, (a, b) in (last.get("changed") or {}).items()) or "nothing"
    times = f"{len(resumes)} time{'s' if len(resumes) > 1 else ''}"
    return ["", f"Resumed {times}; the last resume (from step {last.get('step')}, {last.get('at')}) changed {changed}."]


def _metrics_rows(metrics: dict) -> list[str]:
    rows = []
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append(f"| {key} | {value:.4g} |")
        elif isinstance(value, dict) and isinstance(value.get("top1"), (int, float)):
            rows.append(f"| {key} top-1 | {value['top1']:.2f} % |")
    return rows


def write_run_report(runs: list[Path], out: Path) -> Path:
    """report.md (and one curves PNG per run) in `out`; returns the report's path."""
    lines = ["# Runs", ""]
    for i, run in enumerate(runs):
        record, metrics = read_json(run / "lineage.json") or {}, read_json(run / "metrics.json") or {}
        lines += [f"## {run} ({record.get('task', metrics.get('task', '?'))})", ""]
        if record:
            v = record.get("versions", {})
            lines += [f"Started {record.get('started')}; git `{record.get('git')}`; python {v.get('python')}, torch "
                      f"{v.get('torch')}, accelerate {v.get('accelerate')}.", ""]
        lines += ["Lineage:", ""] + [f"- {line}" for line in lineage_chain(run)] + [""]
        for name, data in (record.get("data") or {}).items():
            lines.append(f"- data.{name}: `{data['spec']}` (index sha256 `{data['index_sha256']}`)")
        changes = record.get("changes") or {}
        if changes:
            lines += ["", "Changed from the tool's defaults: " + ", ".join(f"`{k}={v}`" for k, v in changes.items())]
        lines += _resumes(record.get("resumes") or [])
        rows = _metrics_rows(metrics)
        if rows:
            lines += ["", "| result | value |", "| --- | --- |", *rows]
        fig = plot_run(run)
        if fig is not None:
            png = f"{i:02d}_{re.sub(r'[^A-Za-z0-9_-]', '_', run.name)}_curves.png"
            save_figure(fig, out / png)
            lines += ["", f"![curves of {run.name}]({png})"]
        lines.append("")
    return write_text(out / "report.md", "\n".join(lines))
