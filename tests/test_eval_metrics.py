"""mae_vit.eval: top-k counts, the distributed-safe meter, weighted kNN, few-shot ridge, feature extraction."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mae_vit.errors import DataError
from mae_vit.eval import (
    ClassificationMeter,
    extract_features,
    fewshot_linear,
    knn_accuracy,
    knn_classify,
    topk_correct,
)
from mae_vit.eval.fewshot import fit_predict, ridge_solve, sample_per_class

# ---------------------------------------------------------------- top-k


def _hand_logits():
    # 4 samples, 6 classes. Rank of the target among the logits: 1st, 5th, 6th, 2nd.
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5],  # target 0: rank 1
            [1.0, 9, 8, 2, 3, 4],  # target 3: 9, 8, 4, 3 above it -> rank 5
            [5.0, 4, 3, 2, 1, 0],  # target 5: rank 6
            [0.0, 7, 6, 1, 2, 3],  # target 2: rank 2
        ]
    )
    target = torch.tensor([0, 3, 5, 2])
    return logits, target


def test_topk_correct_counts_hand_made_logits():
    logits, target = _hand_logits()
    assert topk_correct(logits, target, ks=(1, 2, 3, 4, 5, 6)) == {1: 1, 2: 2, 3: 2, 4: 2, 5: 3, 6: 4}


def test_topk_correct_clips_k_to_number_of_classes():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    target = torch.tensor([2, 0])
    # top-5 of a 3-class problem is top-3: every sample counts.
    assert topk_correct(logits, target, ks=(1, 5)) == {1: 1, 5: 2}


def test_meter_compute_exact_numbers_and_per_sample_loss():
    logits, target = _hand_logits()
    meter = ClassificationMeter()
    meter.update(logits[:3], target[:3], torch.tensor([1.0, 2.0, 3.0]))
    meter.update(logits[3:], target[3:], torch.tensor([6.0]))
    out = meter.compute()
    assert out == {"top1": 25.0, "top5": 75.0, "loss": 3.0, "n": 4}


def test_meter_scalar_loss_is_batch_mean_and_missing_loss_is_none():
    logits, target = _hand_logits()
    meter = ClassificationMeter()
    meter.update(logits[:2], target[:2], torch.tensor(1.0))  # batch mean 1 over 2 samples
    meter.update(logits[2:], target[2:], torch.tensor([4.0, 4.0]))
    assert meter.compute()["loss"] == pytest.approx(2.5)
    no_loss = ClassificationMeter()
    no_loss.update(logits, target)
    assert no_loss.compute()["loss"] is None


def test_meter_empty_raises_data_error():
    with pytest.raises(DataError):
        ClassificationMeter().compute()


def test_meter_merge_of_two_process_shares_equals_single_meter():
    torch.manual_seed(0)
    logits, target = torch.randn(13, 7), torch.randint(0, 7, (13,))
    loss = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    whole = ClassificationMeter()
    whole.update(logits, target, loss)
    a, b = ClassificationMeter(), ClassificationMeter()
    a.update(logits[:6], target[:6], loss[:6])
    b.update(logits[6:], target[6:], loss[6:])
    a.merge(b)
    assert a.compute()["n"] == 13
    for key in ("top1", "top5", "loss"):
        assert a.compute()[key] == pytest.approx(whole.compute()[key])


# Two real processes (gloo on CPU) through accelerate, run in a fresh interpreter by the test below.
_N_DIST = 7


def _dist_data():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(_N_DIST, 5, generator=g)
    target = torch.randint(0, 5, (_N_DIST,), generator=g)
    feats = torch.randn(_N_DIST, 4, generator=g)
    return logits, target, feats


def _expected_stats(logits, target):
    meter = ClassificationMeter()
    meter.update(logits, target, torch.nn.functional.cross_entropy(logits, target, reduction="none"))
    return meter.compute()


def _assert_same_stats(got, want):
    assert got["n"] == want["n"] == _N_DIST
    for key in ("top1", "top5", "loss"):
        assert got[key] == pytest.approx(want[key])


def _assert_same_rows(out_feats, out_labels, feats, target):
    order, ref = torch.argsort(out_feats[:, 0]), torch.argsort(feats[:, 0])
    assert out_feats.shape == feats.shape
    assert torch.equal(out_feats[order], feats[ref])
    assert torch.equal(out_labels[order], target[ref])


def _distributed_worker():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    rank = accelerator.process_index
    logits, target, feats = _dist_data()
    want = _expected_stats(logits, target)

    # (A) prepared map-style loader, batch 2 per process: the last step has 3 real samples and one
    # duplicate that gather_for_metrics must drop.
    loader = accelerator.prepare(DataLoader(TensorDataset(torch.arange(_N_DIST), target), batch_size=2))
    meter = ClassificationMeter()
    for i, y in loader:
        loss = torch.nn.functional.cross_entropy(logits[i], y, reduction="none")
        meter.update(*accelerator.gather_for_metrics((logits[i], y, loss)))
    _assert_same_stats(meter.compute(), want)

    # (B) rank-sharded loaders of unequal size (5 + 2 samples, then 7 + 0: rank 1 has no batch at all).
    for split in (5, 7):
        share = torch.arange(split) if rank == 0 else torch.arange(split, _N_DIST)
        local = DataLoader(TensorDataset(share, target[share]), batch_size=2)
        meter = ClassificationMeter()
        for i, y in local:
            meter.update(logits[i], y, torch.nn.functional.cross_entropy(logits[i], y, reduction="none"))
        _assert_same_stats(meter.reduced(accelerator).compute(), want)
        assert meter.n == len(share)  # the local totals are left unchanged by reduced()
        _assert_same_rows(*extract_features(lambda i: feats[i], local, accelerator), feats, target)
        _assert_same_rows(*extract_features(lambda i: feats[i], local, accelerator, on_device=True), feats, target)

    # (C) kNN across processes: each scores its own half of the queries, and both return the whole set's number.
    from mae_vit.eval import knn as knn_module
    scored, classify = [], knn_module.knn_classify
    knn_module.knn_classify = lambda tr, y, q, **o: scored.append(q.shape[0]) or classify(tr, y, q, **o)
    bank, bank_y = feats.repeat(3, 1), (torch.arange(3 * _N_DIST) % 5)
    alone = knn_accuracy(bank, bank_y, feats, target, num_classes=5, k=3)  # scores all 7 queries
    shared = knn_accuracy(bank, bank_y, feats, target, accelerator, num_classes=5, k=3)
    assert shared == alone and scored == [7, 4 if rank == 0 else 3]


def test_meter_and_extract_features_across_two_accelerate_processes():
    # accelerate's debug_launcher forks; forking a process whose torch thread pools are already running
    # (as pytest's is after earlier tests) can deadlock, so launch from a fresh interpreter with a timeout.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_eval_metrics; "
        "from accelerate import debug_launcher; debug_launcher(test_eval_metrics._distributed_worker, num_processes=2)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---------------------------------------------------------------- kNN


def test_knn_clustered_points_are_classified_certainly():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3) * 10  # three far-apart directions
    train = torch.cat([centres[c] + 0.1 * torch.randn(20, 3, generator=g) for c in range(3)])
    train_y = torch.arange(3).repeat_interleave(20)
    test = torch.cat([centres[c] + 0.1 * torch.randn(5, 3, generator=g) for c in range(3)])
    test_y = torch.arange(3).repeat_interleave(5)
    assert knn_accuracy(train, train_y, test, test_y, num_classes=3, k=10) == 100.0
    # A wrong-labelled copy of the training set gives 0 % (so the test can fail).
    assert knn_accuracy(train, (train_y + 1) % 3, test, test_y, num_classes=3, k=10) == 0.0


def test_knn_holds_a_bounded_similarity_matrix_whatever_the_bank_size(monkeypatch):
    from mae_vit.eval import knn as knn_module
    g = torch.Generator().manual_seed(0)
    bank, bank_y, queries = torch.randn(50, 4, generator=g), torch.arange(50) % 3, torch.randn(40, 4, generator=g)
    want = knn_classify(bank, bank_y, queries, num_classes=3, k=5)
    monkeypatch.setattr(knn_module, "MAX_SIM_ELEMENTS", 50 * 8)  # room for 8 query rows against the 50-row bank
    shapes = []
    real_normalize = knn_module.F.normalize
    monkeypatch.setattr(knn_module.F, "normalize", lambda x, **kw: shapes.append(x.shape[0]) or real_normalize(x, **kw))
    torch.testing.assert_close(knn_classify(bank, bank_y, queries, num_classes=3, k=5), want)
    assert shapes == [50, 8, 8, 8, 8, 8]  # the bank once, then 40 queries 8 at a time


def test_each_process_scores_a_contiguous_share_of_the_queries_every_query_once():
    from mae_vit.eval.knn import query_share
    for n, world in ((7, 2), (10, 3), (2, 4), (0, 2)):
        rows = [i for r in range(world) for i in range(n)[query_share(n, r, world)]]
        assert rows == list(range(n))
    assert query_share(7, 0, 2) == slice(0, 4) and query_share(7, 1, 2) == slice(4, 7)


def test_knn_weighted_vote_matches_hand_computation():
    s = 1 / math.sqrt(2)
    train = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [-1.0, 0.0]])  # cos to (1,0): 1, 0, s, -1
    labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[5.0, 0.0]])
    # k=3 keeps the neighbours with similarity 1 (class 0), s and 0 (class 1).
    scores = knn_classify(train, labels, query, num_classes=3, k=3, temperature=0.5)
    expected = torch.tensor([[math.exp(1 / 0.5), math.exp(s / 0.5) + math.exp(0.0), 0.0]])
    torch.testing.assert_close(scores, expected)
    assert scores.argmax().item() == 0  # the single close neighbour outweighs two far ones at low T
    hot = knn_classify(train, labels, query, num_classes=3, k=3, temperature=10.0)
    assert hot.argmax().item() == 1  # at high T the vote is nearly a plain majority: class 1 wins
    # k=4 adds the opposite point (similarity -1) to class 0.
    all4 = knn_classify(train, labels, query, num_classes=3, k=4, temperature=0.5)
    assert all4[0, 0].item() == pytest.approx(math.exp(2) + math.exp(-2), rel=1e-6)


def test_knn_chunking_does_not_change_scores_and_k_is_clipped():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(30, 8, generator=g), torch.randn(11, 8, generator=g)
    labels = torch.randint(0, 4, (30,), generator=g)
    full = knn_classify(train, labels, test, num_classes=4, k=5, chunk=1024)
    # (float32 sums of exp(s / 0.07) ~ 1e6: compare relatively)
    torch.testing.assert_close(knn_classify(train, labels, test, num_classes=4, k=5, chunk=3), full, rtol=1e-5, atol=0)
    # k larger than N uses every training point: the total vote is the sum of exp(sim/T) over all of them.
    big = knn_classify(train, labels, test, num_classes=4, k=100, temperature=1.0)
    sims = torch.nn.functional.normalize(test, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    torch.testing.assert_close(big.sum(1), sims.exp().sum(1))


def test_knn_label_out_of_range_is_a_data_error():
    with pytest.raises(DataError, match="num_classes"):
        knn_classify(torch.randn(4, 2), torch.tensor([0, 1, 2, 3]), torch.randn(1, 2), num_classes=3)


# ---------------------------------------------------------------- few-shot


def _blobs(per_class, noise_seed, num_classes=4, dim=8, spread=0.3):
    """Gaussian blobs around fixed class centres (same centres for every call), noise drawn from `noise_seed`."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234)) * 5
    g = torch.Generator().manual_seed(noise_seed)
    x = torch.cat([centres[c] + spread * torch.randn(per_class, dim, generator=g) for c in range(num_classes)])
    return x, torch.arange(num_classes).repeat_interleave(per_class)


def test_fewshot_separable_blobs_reach_100_percent():
    train_x, train_y = _blobs(30, noise_seed=0)
    test_x, test_y = _blobs(10, noise_seed=1)
    res = fewshot_linear(train_x, train_y, test_x, test_y, num_classes=4, shots=(1, 5), draws=3)
    for s in (1, 5):
        assert res[s]["accs"] == [100.0, 100.0, 100.0]
        assert res[s]["mean"] == 100.0 and res[s]["std"] == 0.0 and res[s]["note"] is None


def test_fewshot_three_sample_case_matches_numpy_ridge():
    # One example per class, so the single 1-shot draw is forced; the prediction must equal numpy's.
    train_x = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 0.5]])
    train_y = torch.tensor([0, 1, 2])
    test_x = torch.tensor([[2.0, 1.0], [0.0, 2.0], [3.0, -2.0], [-1.0, 0.0], [1.5, 0.5]])
    l2 = 0.5

    x = train_x.numpy().astype(np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-5
    xa = np.hstack([(x - mean) / std, np.ones((3, 1))])
    y = 2 * np.eye(3) - 1
    w = np.linalg.solve(xa.T @ xa + l2 * np.eye(3), xa.T @ y)
    ta = np.hstack([(test_x.numpy() - mean) / std, np.ones((5, 1))])
    pred = (ta @ w).argmax(1)
    test_y = torch.tensor([0, 2, 1, 2, 1])
    expected_acc = 100.0 * float((pred == test_y.numpy()).mean())

    res = fewshot_linear(train_x, train_y, test_x, test_y, num_classes=3, shots=(1,), draws=2, l2=l2)
    assert res[1]["accs"] == [pytest.approx(expected_acc)] * 2
    # and a second labelling where exactly the numpy predictions are right gives 100 %
    res_all = fewshot_linear(train_x, train_y, test_x, torch.from_numpy(pred), num_classes=3, shots=(1,), l2=l2)
    assert res_all[1]["mean"] == 100.0


def test_ridge_solve_is_the_regularised_least_squares_minimiser():
    x = torch.tensor([[1.0, 2.0, 1.0], [3.0, -1.0, 1.0], [0.0, 0.5, 1.0]])
    y = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    l2 = 0.3
    w = ridge_solve(x, y, l2)
    assert w.dtype == torch.float64
    # Independent formulation: ordinary least squares on the stacked system [X; sqrt(l2) I] W = [Y; 0].
    a = np.vstack([x.numpy(), math.sqrt(l2) * np.eye(3)])
    b = np.vstack([y.numpy(), np.zeros((3, 2))])
    w_np = np.linalg.lstsq(a, b, rcond=None)[0]
    np.testing.assert_allclose(w.numpy(), w_np, rtol=1e-9, atol=1e-12)


def test_fewshot_prediction_does_not_depend_on_test_chunking():
    train_x, train_y = _blobs(5, noise_seed=6, spread=4.0)
    test_x, _ = _blobs(7, noise_seed=7, spread=4.0)
    whole = fit_predict(train_x, train_y, test_x, num_classes=4, l2=1e-3)
    assert whole.shape == (28,)
    assert torch.equal(fit_predict(train_x, train_y, test_x, num_classes=4, l2=1e-3, chunk=3), whole)


def test_fewshot_draws_are_reproducible_and_seed_dependent():
    train_x, train_y = _blobs(40, noise_seed=2, spread=4.0)  # overlapping blobs: accuracy varies between draws
    test_x, test_y = _blobs(15, noise_seed=3, spread=4.0)
    a = fewshot_linear(train_x, train_y, test_x, test_y, num_classes=4, shots=(2,), draws=4, seed=7)
    b = fewshot_linear(train_x, train_y, test_x, test_y, num_classes=4, shots=(2, 5), draws=4, seed=7)
    assert a[2]["accs"] == b[2]["accs"]  # same seed, and independent of the other shot counts requested
    assert len(set(a[2]["accs"])) > 1  # the draws differ from each other...
    other = fewshot_linear(train_x, train_y, test_x, test_y, num_classes=4, shots=(2,), draws=4, seed=8)
    assert other[2]["accs"] != a[2]["accs"]  # ...and from another seed's draws
    g0, g1 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    i0, i1 = sample_per_class(train_y, 5, 4, g0), sample_per_class(train_y, 5, 4, g1)
    assert not torch.equal(i0, i1)
    assert torch.equal(torch.bincount(train_y[i0], minlength=4), torch.tensor([5, 5, 5, 5]))
    assert len(set(i0.tolist())) == 20  # distinct examples


def test_fewshot_skips_shot_counts_larger_than_smallest_class():
    train_x, train_y = _blobs(6, noise_seed=4)
    train_x, train_y = train_x[1:], train_y[1:]  # class 0 now has 5 examples
    test_x, test_y = _blobs(3, noise_seed=5)
    res = fewshot_linear(train_x, train_y, test_x, test_y, num_classes=4, shots=(5, 6), draws=1)
    assert res[5]["mean"] == 100.0
    assert res[6]["mean"] is None and res[6]["accs"] == []
    assert "class 0 has only 5" in res[6]["note"]


# ---------------------------------------------------------------- feature extraction


def test_extract_features_single_process_order_and_types():
    x = torch.arange(10, dtype=torch.float64).reshape(5, 2)
    y = torch.tensor([4, 3, 2, 1, 0], dtype=torch.int32)
    feats, labels = extract_features(lambda b: b * 2, DataLoader(TensorDataset(x, y), batch_size=2))
    assert feats.dtype == torch.float32 and labels.dtype == torch.int64
    assert torch.equal(feats, (x * 2).float())
    assert torch.equal(labels, y.long())
    dict_loader = [{"image": x[:3], "label": y[:3]}]
    assert torch.equal(extract_features(lambda b: b, dict_loader)[1], y[:3].long())
    with pytest.raises(DataError):
        extract_features(lambda b: b, [])
