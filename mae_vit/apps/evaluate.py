"""Evaluate a checkpoint: top-1/top-5 of its classifier, kNN and few-shot accuracy of its frozen features.

1. Model: the checkpoint's run directory says what was trained (`model_config_from_run`: defaults <
   the run's config.yaml < the user's model.* keys); the weights decide probe_bn, global_pool and an
   unset num_classes. The LoadReport is logged.
2. Data: data.val (always) and data.train (the kNN / few-shot pool); without --data the synthetic
   demo shards. Evaluation transform (resize + centre crop), file order, nothing dropped. Each process
   reads its own share of the shards (make_loader's rank split, not `accelerator.prepare`) and the
   shares are combined once at the end, so every sample is counted exactly once on any number of
   processes (plain python or `accelerate launch`).
3. Metrics (`metrics=[...]`):
     top1     top-1 / top-5 / mean cross-entropy of the classifier on data.val
     knn      weighted kNN of val features against train features (knn.k, knn.temperature)
     fewshot  closed-form ridge regression on fewshot.shots examples per class, mean ± std over
              fewshot.draws random draws (fewshot.l2)
   Features: the class token after the final norm for an MAE; a classifier's pooled pre-head features.
4. `{output_dir}/metrics.json` (written by the main process) and a table on stdout.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from mae_vit.checkpoint import read_file, to_state_dict
from mae_vit.data import make_loader, rank_batch_counts, read_index
from mae_vit.errors import CheckpointError, ConfigError, DataError
from mae_vit.eval import classifier_metrics, extract_features, fewshot_linear, knn_accuracy
from mae_vit.files import write_json
from mae_vit.train.batches import transform_for
from mae_vit.train.build import model_from_weights, resolve_data
from mae_vit.train.device import make_accelerator
from mae_vit.train.monitor import setup_logging
from mae_vit.train.run_config import model_config_from_run

log = logging.getLogger("mae_vit")

METRICS_FILE = "metrics.json"
TOOL_MARK = "evaluate"  # metrics.json files carrying {"tool": "evaluate"} may be replaced by a new evaluation
FEWSHOT_SEED = 0


def evaluate(cfg: DictConfig, *, user_keys: Collection[str] = ()) -> dict:
    """Evaluate `cfg.checkpoint` as configured (EvaluateConfig); returns the dict written to metrics.json.

    `user_keys`: the dotted keys the user set (`build.user_set_keys`); they win over the run's
    config.yaml, and `metrics` among them makes `top1` on an MAE checkpoint an error rather than a
    skipped metric. Every process must call this; each returns the same numbers.
    """
    if cfg.checkpoint is None:
        raise ConfigError("no checkpoint to evaluate: pass --checkpoint PATH (a run directory such as runs/finetune, "
                          "a .safetensors file in one, or an official MAE / timm weights file).")
    out_dir = Path(cfg.output_dir).expanduser()
    check_output_dir(out_dir)
    accelerator = make_accelerator(str(out_dir))
    setup_logging(accelerator.is_main_process)
    cfg = model_config_from_run(cfg.checkpoint, cfg, user_keys=user_keys)
    state_dict = to_state_dict(read_file(cfg.checkpoint))  # a bad path fails here, before any data is touched
    train_urls, val_urls = resolve_data(cfg, accelerator, counted=False)  # read to the end: no plan
    if val_urls is None:
        raise DataError("evaluation needs labelled validation shards: set data.val=URLS (brace-expanded WebDataset "
                        "shards with labels, e.g. data.val='data/val/shard-{000000..000009}.tar').")
    index = read_index(val_urls) or read_index(train_urls)
    index_classes = index["num_classes"] if index else None

    m, d = cfg.model, cfg.data
    model, report = model_from_weights(m, state_dict, source=cfg.checkpoint, num_classes=index_classes)
    model.to(accelerator.device)
    metrics = list(dict.fromkeys(cfg.metrics))  # keep the order, drop repeats
    results: dict = {"tool": TOOL_MARK, "checkpoint": str(cfg.checkpoint), "model": OmegaConf.to_container(m),
                     "data": {"train": train_urls, "val": val_urls}, "load_report": str(report),
                     "metrics": {}, "skipped": {}}
    if "top1" in metrics and not top1_applies(cfg, report, results, asked="metrics" in user_keys):
        metrics.remove("top1")

    tf = transform_for(cfg, "eval")
    rank, world = accelerator.process_index, accelerator.num_processes

    def loader(urls: str):
        return make_loader(urls, transform=tf, batch_size=d.batch_size, num_workers=d.num_workers, rank=rank,
                           world_size=world, shuffle=False, drop_last=False, in_chans=m.in_chans,
                           pin_memory=accelerator.device.type == "cuda")

    def progress(urls: str, desc: str):
        """The batches of `urls` behind a progress bar (on a terminal, on the main process)."""
        total = rank_batches(urls, rank=rank, world_size=world, num_workers=d.num_workers, batch_size=d.batch_size)
        return tqdm(loader(urls), total=total, desc=desc, unit="batch",
                    disable=None if accelerator.is_main_process else True)

    if "top1" in metrics:
        results["metrics"]["top1"] = classifier_metrics(model, progress(val_urls, "top-1 on val"), accelerator)
    if "knn" in metrics or "fewshot" in metrics:
        fn = feature_fn(model)
        train_x, train_y = features_in_key_order(fn, progress(train_urls, "features of train"), accelerator)
        val_x, val_y = features_in_key_order(fn, progress(val_urls, "features of val"), accelerator)
        k_classes = index_classes or int(max(train_y.max(), val_y.max())) + 1
        results["data"].update(num_train=int(train_y.numel()), num_val=int(val_y.numel()), num_classes=k_classes)
        if "knn" in metrics:
            acc = knn_accuracy(train_x, train_y, val_x, val_y, accelerator, num_classes=k_classes,
                               k=cfg.knn.k, temperature=cfg.knn.temperature)
            results["metrics"]["knn"] = {"top1": acc, "k": cfg.knn.k, "temperature": cfg.knn.temperature}
        if "fewshot" in metrics:
            shots = fewshot_linear(train_x, train_y, val_x, val_y, num_classes=k_classes, shots=list(cfg.fewshot.shots),
                                   draws=cfg.fewshot.draws, l2=cfg.fewshot.l2, seed=FEWSHOT_SEED)
            results["metrics"]["fewshot"] = {"draws": cfg.fewshot.draws, "l2": cfg.fewshot.l2,
                                             "shots": {str(s): r for s, r in shots.items()}}

    if accelerator.is_main_process:
        write_json(out_dir / METRICS_FILE, results)
        print(format_table(results))
        print(f"metrics written to {out_dir / METRICS_FILE}")
    accelerator.wait_for_everyone()
    return results


def top1_applies(cfg: DictConfig, report, results: dict, *, asked: bool) -> bool:
    """Whether top-1 can be measured: a classifier with its trained head. An MAE has no head: top-1 is
    skipped (and noted in `results`), or refused when the user `asked` for it by name."""
    if not cfg.model.name.startswith("mae_"):
        check_head_loaded(report, cfg.checkpoint)
        return True
    if asked:
        raise ConfigError(
            f"metrics includes top1, but {cfg.checkpoint} is an MAE ({cfg.model.name}) without a classifier head. "
            "Fine-tune or linear-probe it first (tools/finetune.py, tools/linprobe.py), or evaluate its "
            "features with metrics=[knn,fewshot]."
        )
    results["skipped"]["top1"] = "an MAE checkpoint has no classifier head (fine-tune or linear-probe it first)"
    log.info("top1 skipped: %s", results["skipped"]["top1"])
    return False


def check_output_dir(out_dir: Path) -> None:
    """ConfigError when `out_dir` is not a folder, or holds a metrics.json this tool did not write.

    A training run's metrics.json (fine-tuning writes one) is never replaced by an evaluation.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output_dir {out_dir} exists and is not a folder; choose a folder with --output-dir.")
    target = out_dir / METRICS_FILE
    if not target.exists():
        return
    try:
        ours = json.loads(target.read_text(encoding="utf-8")).get("tool") == TOOL_MARK
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ConfigError(
            f"{target} already exists and was not written by evaluate (a training run's metrics?); it is left "
            "untouched. Choose another folder with --output-dir, e.g. --output-dir runs/evaluate."
        )


def check_head_loaded(report, checkpoint) -> None:
    """CheckpointError when the classifier head did not come from the checkpoint (top-1 would be meaningless)."""
    head = [k for k in report.missing + report.skipped if k.startswith("head.")]
    if head:
        raise CheckpointError(
            f"{checkpoint} has no trained head for this classifier ({', '.join(head)} "
            f"{'not in the checkpoint' if set(head) & set(report.missing) else 'of another shape'}): this checkpoint "
            "has no trained head; run finetune or linprobe first, or use metrics=[knn,fewshot] to evaluate its "
            "features."
        )


def feature_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """images (B, C, H, W) -> features (B, D): an MAE's class token after the final norm, a classifier's pooled
    pre-head features (class token or fc_norm of the patch-token mean, as it was trained)."""
    if hasattr(model, "pool"):
        return lambda x: model.pool(model.forward_features(x))
    return lambda x: model.forward_features(x)[:, 0]


def key_id(key: str) -> int:
    """A sample key (the tar member name stem, unique in a data set) -> a stable non-negative int64."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def features_in_key_order(fn: Callable[[torch.Tensor], torch.Tensor], loader: Iterable[dict],
                          accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """`extract_features` over all processes, rows sorted by `key_id` of each sample's key: (N, D), (N,).

    The gathered order otherwise depends on how samples were dealt to processes and loader workers;
    in key order the few-shot draws (which pick rows by position) give the same numbers however the
    evaluation was run. The key id travels through extract_features as a second label column.
    """
    def keyed(batches):
        for batch in batches:
            ids = torch.tensor([key_id(k) for k in batch["key"]], dtype=torch.long)  # (B,)
            yield batch["image"], torch.stack([batch["label"].long(), ids], dim=1)  # (B, C, H, W), (B, 2)

    feats, label_ids = extract_features(fn, keyed(loader), accelerator)  # (N, D), (N, 2)
    order = torch.argsort(label_ids[:, 1], stable=True)
    return feats[order], label_ids[order, 0]


def rank_batches(urls: str, *, rank: int, world_size: int, num_workers: int, batch_size: int) -> int | None:
    """Batches this rank's evaluation loader yields; None when unknown (remote shards without an index).
    Only sizes the progress bar."""
    try:
        return rank_batch_counts(urls, world_size=world_size, num_workers=num_workers, batch_size=batch_size,
                                 shuffle=False, drop_last=False)[rank]
    except DataError:
        return None


def format_table(results: dict) -> str:
    """The metrics of `results` (as `evaluate` returns them) as a small aligned text table."""
    rows: list[tuple[str, str]] = []
    metrics = results["metrics"]
    if "top1" in metrics:
        t = metrics["top1"]
        rows += [(f"top-1 (val, n={t['n']})", f"{t['top1']:.2f} %"), ("top-5", f"{t['top5']:.2f} %")]
        if t.get("loss") is not None:
            rows.append(("val loss (cross-entropy)", f"{t['loss']:.4f}"))
    if "knn" in metrics:
        k = metrics["knn"]
        rows.append((f"kNN top-1 (k={k['k']}, T={k['temperature']:g})", f"{k['top1']:.2f} %"))
    if "fewshot" in metrics:
        f = metrics["fewshot"]
        for shots, r in f["shots"].items():
            label = f"{shots}-shot linear ({f['draws']} draws)"
            rows.append((label, f"{r['mean']:.2f} ± {r['std']:.2f} %" if r["mean"] is not None else r["note"]))
    for name, why in results.get("skipped", {}).items():
        rows.append((name, f"skipped: {why}"))
    width = max([len("metric")] + [len(r[0]) for r in rows]) + 2
    lines = [f"{'metric':<{width}}value"] + [f"{name:<{width}}{value}" for name, value in rows]
    return "\n".join(lines)
