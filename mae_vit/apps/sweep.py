"""Which checkpoint to fine-tune: score every kept checkpoint of a pretraining run, plot, export the best.

    python tools/sweep.py --run runs/pretrain          # the run's own data, kNN + few-shot

For each complete checkpoint (and the exported final weights) the MAE's frozen class-token features of
the labelled training (memory bank / few-shot pool) and validation shards give a kNN top-1 and a
few-shot linear accuracy (the largest shot count in `fewshot.shots`). Written into the run directory:
`sweep.json` (one row per step), `sweep.png` (quality against step) and `best_encoder.safetensors`
(the weights of the checkpoint with the best kNN top-1). Keep more checkpoints (`train.keep_last`) for
a finer curve.

Choosing a checkpoint is a choice: it is made on data.val, which should be held out from the training
set, never the test split the result is reported on. The Fashion-MNIST chain's pretraining run has its
held-out split as data.val, so `--run runs/fashion_mnist_cpu/pretrain` chooses on it; evaluate the
exported encoder on the test split once afterwards (tools/evaluate.py with data.val=<test shards>).
"""

from __future__ import annotations

import logging
from pathlib import Path

from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from mae_vit.apps.evaluate import FEWSHOT_SEED, feature_fn, features_in_key_order
from mae_vit.checkpoint import EXPORT_NAME, export_safetensors, read_file, to_state_dict
from mae_vit.config.trust import check_trust
from mae_vit.data import make_loader, read_index
from mae_vit.errors import ConfigError, DataError
from mae_vit.eval import fewshot_linear, knn_accuracy
from mae_vit.files import write_json
from mae_vit.train.batches import transform_for
from mae_vit.train.build import model_from_weights, resolve_data
from mae_vit.train.device import make_accelerator
from mae_vit.train.monitor import on_main_process, setup_logging
from mae_vit.train.run_config import model_config_from_run
from mae_vit.train.rundir import RunDir, read_state
from mae_vit.viz.io import save_figure

log = logging.getLogger("mae_vit")


def sweep(cfg: DictConfig, user_keys=(), allowed=()) -> dict:
    """Score the checkpoints of `cfg.run`; returns what sweep.json holds. `allowed`: the command line's trust
    flags (`check_trust`), which the data taken from the run's config.yaml must pass."""
    run = RunDir(cfg.run)
    points = [(read_state(p).step, p / "model.safetensors") for p in run.complete_checkpoints()]
    final = run.path / EXPORT_NAME
    if final.is_file() and run.latest() is not None:
        points.append((read_state(run.latest()).step, final))
    if not points:
        raise ConfigError(f"{run.path} holds no checkpoints to score: pass the output directory of a pretraining run "
                          "(--run runs/pretrain).")
    accelerator = make_accelerator(str(run.path))
    setup_logging(accelerator.is_main_process)
    cfg = model_config_from_run(run.path, cfg, user_keys=user_keys)
    if run.config_file.is_file() and not {"data.train", "data.val"} & set(user_keys):  # the run's own data
        saved = OmegaConf.to_container(OmegaConf.load(run.config_file), resolve=False).get("data") or {}
        for name in ("train", "val", "cache_dir", "synthetic_samples", "synthetic_classes"):
            if name in saved:
                cfg.data[name] = saved[name]
    check_trust(cfg, allowed, typed=user_keys)  # config.yaml is a config file too: no pipe:, no environment
    train_urls, val_urls = resolve_data(cfg, accelerator)
    if val_urls is None or not (read_index(train_urls) or {}).get("num_classes"):
        raise DataError("the sweep needs labelled training and validation shards (data.train, data.val).")
    rows = [score(cfg, step, path, train_urls, val_urls, accelerator) for step, path in points]
    best = max(rows, key=lambda r: (r["knn"], r["step"]))
    result = {"run": str(run.path), "data": {"train": train_urls, "val": val_urls}, "k": cfg.knn.k,
              "shots": max(cfg.fewshot.shots), "points": rows, "best": best}

    def write() -> None:
        model, _ = model_from_weights(cfg.model, to_state_dict(read_file(best["weights"])), source=best["weights"])
        export_safetensors(model, run.path / "best_encoder.safetensors")
        write_json(run.path / "sweep.json", result)
        save_figure(plot(rows, result["shots"]), run.path / "sweep.png")

    on_main_process(accelerator, write)
    log.info("best checkpoint by kNN top-1 on data.val (%s): step %d (%.2f%%), exported to %s", val_urls, best["step"],
             best["knn"], run.path / "best_encoder.safetensors")
    return result


def score(cfg: DictConfig, step: int, weights: Path, train_urls: str, val_urls: str, accelerator) -> dict:
    """kNN top-1 and few-shot accuracy (%) of one checkpoint's frozen features."""
    model, _ = model_from_weights(cfg.model, to_state_dict(read_file(weights)), source=weights)
    model.to(accelerator.device)
    d = cfg.data

    def features(urls):
        loader = make_loader(urls, transform=transform_for(cfg, "eval"), batch_size=d.batch_size,
                             num_workers=d.num_workers, rank=accelerator.process_index,
                             world_size=accelerator.num_processes, shuffle=False, drop_last=False,
                             in_chans=cfg.model.in_chans)
        return features_in_key_order(feature_fn(model), loader, accelerator)

    (train_x, train_y), (val_x, val_y) = features(train_urls), features(val_urls)
    classes = int(max(train_y.max(), val_y.max())) + 1
    knn = knn_accuracy(train_x, train_y, val_x, val_y, accelerator, num_classes=classes, k=cfg.knn.k,
                       temperature=cfg.knn.temperature)
    shots = max(cfg.fewshot.shots)
    few = fewshot_linear(train_x, train_y, val_x, val_y, num_classes=classes, shots=[shots], draws=cfg.fewshot.draws,
                         l2=cfg.fewshot.l2, seed=FEWSHOT_SEED)[shots]
    log.info("step %d: kNN top-1 %.2f%%, %d-shot %s", step, knn, shots,
             "n/a" if few["mean"] is None else f"{few['mean']:.2f}%")
    return {"step": step, "knn": knn, "fewshot": few["mean"], "weights": str(weights)}


def plot(rows: list[dict], shots: int) -> Figure:
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["knn"] for r in rows], "o-", label="kNN top-1")
    if all(r["fewshot"] is not None for r in rows):
        ax.plot(steps, [r["fewshot"] for r in rows], "s--", label=f"{shots}-shot linear")
    ax.set_xlabel("pretraining step")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig
