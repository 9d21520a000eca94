"""The kNN benchmark: both ways run, the bounded one holds at most MAX_SIM_ELEMENTS similarities."""

import torch

from mae_vit.bench.knn_speed import knn_markdown, knn_speed
from mae_vit.eval import knn


def test_the_knn_benchmark_times_both_ways_and_the_bounded_one_holds_a_bounded_matrix(monkeypatch):
    bank = 1000
    monkeypatch.setattr(knn, "MAX_SIM_ELEMENTS", 16 * bank)  # room for 16 query rows against this bank
    result = knn_speed(torch.device("cpu"), bank=bank, queries=64, dim=8, classes=10, processes=4)
    before, after = result["rows"]
    assert before["similarity_bytes"] == 64 * bank * 4 and after["similarity_bytes"] == 16 * bank * 4
    assert after["per_process_seconds"] == after["seconds"] / 4 and before["per_process_seconds"] == before["seconds"]
    table = knn_markdown(result)
    assert "| bounded chunks |" in table and f"bank {bank:,} x 8" in table
