"""The raw-pixel baseline on data with a known answer, and the chain's report on a tiny synthetic run."""

import json

import pytest
import torch

from mae_vit.eval.pixels import logistic_accuracy, pixel_baseline
from mae_vit.viz.report import collect, read_scalars, write_report


def halves(n: int, seed: int):
    """8x8 grey images: class 0 bright on the left half, class 1 on the right half, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.2
    x[y == 0, :, :, :4] += 0.8
    x[y == 1, :, :, 4:] += 0.8
    return x, y


def test_pixel_baselines_separate_two_obvious_classes_perfectly():
    (tx, ty), (vx, vy) = halves(40, 0), halves(20, 1)
    assert pixel_baseline(tx, ty, vx, vy, num_classes=2, k=5) == {"knn": 100.0, "logistic": 100.0}


def test_logistic_regression_learns_the_sign_of_one_feature_and_ignores_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g)
    y = (x[:, 2] > 0).long()                      # only feature 2 matters
    acc = logistic_accuracy(x[:300], y[:300], x[300:], y[300:], num_classes=2)
    assert acc >= 97.0
    shuffled = logistic_accuracy(x[:300], y[torch.randperm(300, generator=g)], x[300:], y[300:], num_classes=2)
    assert shuffled < 75.0                       # labels unrelated to the pixels: near chance (50%)


def fake_chain(out, held_out=False):
    """The files a finished chain leaves: metrics.json per run, TensorBoard scalars, timings, pixels. `held_out`:
    as the chain leaves them today (each training run chose on a held-out val split and evaluated test once)."""
    from torch.utils.tensorboard import SummaryWriter

    def run(name, metrics, tag=None, values=()):
        (out / name).mkdir(parents=True)
        (out / name / "metrics.json").write_text(json.dumps(metrics))
        if tag:
            with SummaryWriter(str(out / name / "logs")) as w:
                for step, v in values:
                    w.add_scalar(tag, v, step)

    run("pretrain", {"first_loss": 1.2, "last_loss": 0.4, "vs_random": {"pretrained": 70.0, "random_init": 40.0}},
        "train/loss", [(10, 1.0), (20, 0.6), (30, 0.4)])
    run("evaluate", {"metrics": {"knn": {"top1": 71.5}, "fewshot": {"draws": 5, "shots": {"25": {"mean": 55.0}}}}})
    def tested(top1, epoch):
        return {"test": {"top1": top1, "top5": 99.0, "n": 10000, "chosen_by": f"val top-1 at epoch {epoch}"},
                "best": {"top1": top1 + 1, "epoch": epoch}} if held_out else {}

    run("linprobe", {"final": {"top1": 75.3, "epoch": 90, "step": 900}, **tested(74.1, 60)})
    for name, accs in (("finetune_mae", [80.0, 88.0]), ("finetune_scratch", [70.0, 85.0])):
        run(name, {"final": {"top1": accs[-1], "epoch": 2, "step": 200}, **tested(accs[-1] - 0.5, 2)}, "val/top1",
            [(100, accs[0]), (200, accs[1])])
    (out / "wall_time.json").write_text(json.dumps({"pretrain": 600.0, "finetune_mae": 120.0}))
    (out / "pixels.json").write_text(json.dumps({"knn": 82.0, "logistic": 84.0, "seconds": 6.0}))


def test_tensorboard_scalars_are_read_back_in_step_order(tmp_path):
    fake_chain(tmp_path)
    assert read_scalars(tmp_path / "pretrain", "train/loss") == [(10, 1.0), (20, pytest.approx(0.6)),
                                                                 (30, pytest.approx(0.4))]
    assert read_scalars(tmp_path / "pretrain", "no/such/tag") == []


def test_report_has_the_table_the_json_and_both_curves(tmp_path):
    fake_chain(tmp_path)
    report = write_report(tmp_path, preset="cpu", commands={"pretrain": "python tools/pretrain.py ..."})
    text = report.read_text()
    assert "| fine-tuned from the MAE weights | 88.0 | data.val, last epoch | 2.0 min | " + str(
        tmp_path / "finetune_mae") in text
    assert "| fine-tuned from scratch | 85.0 | data.val, last epoch | - min |" in text  # no timing: shown as missing
    assert "| linear probe, MAE encoder (frozen) | 75.3 | data.val, last epoch | - min |" in text
    assert "| kNN, encoder at random init | 40.0 | data.val | 10.0 min |" in text
    assert "MAE pretraining loss 1.200 -> 0.400" in text and "`python tools/pretrain.py ...`" in text
    results = json.loads((tmp_path / "results.json").read_text())
    by_what = {r["what"]: r["top1"] for r in results["rows"]}
    assert by_what["logistic regression on raw pixels"] == 84.0 and by_what["kNN, MAE encoder (frozen)"] == 71.5
    assert by_what["25-shot linear, MAE encoder"] == 55.0
    for png in ("pretrain_loss.png", "finetune_top1.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["figures"] == ["pretrain_loss.png", "finetune_top1.png"]


def test_a_missing_run_shows_as_a_dash_not_an_error(tmp_path):
    rows = collect(tmp_path, "cpu")["rows"]
    assert all(r["top1"] is None for r in rows)


def test_report_gives_the_test_top1_of_the_weights_chosen_on_held_out_val_and_says_which_split_chose_what(tmp_path):
    fake_chain(tmp_path, held_out=True)
    splits = {"train": 55000, "val": 5000, "test": 10000, "seed": 0, "source": 60000}
    text = write_report(tmp_path, preset="cpu", splits=splits).read_text()
    assert "| fine-tuned from the MAE weights | 87.5 | test, chosen on held-out val (epoch 2) | 2.0 min |" in text
    assert "| fine-tuned from scratch | 84.5 | test, chosen on held-out val (epoch 2) |" in text
    assert "| linear probe, MAE encoder (frozen) | 74.1 | test, chosen on held-out val (epoch 60) |" in text
    assert "| kNN, MAE encoder (frozen) | 71.5 | test |" in text
    assert "| kNN, encoder at random init | 40.0 | held-out val |" in text
    assert "| logistic regression on raw pixels | 84.0 | test |" in text
    assert "5,000 of the 60,000 training images (seed 0)" in text and "55,000" in text
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["splits"] == splits
    row = next(r for r in results["rows"] if r["what"] == "fine-tuned from the MAE weights")
    assert row["split"] == "test, chosen on held-out val (epoch 2)" and row["val_top1"] == 88.5


def test_a_run_without_a_test_evaluation_is_labelled_with_its_val_split(tmp_path):
    fake_chain(tmp_path)  # an older chain: the numbers are the last epoch's on data.val
    text = write_report(tmp_path, preset="cpu").read_text()
    assert "| fine-tuned from the MAE weights | 88.0 | data.val, last epoch |" in text
