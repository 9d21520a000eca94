"""Benchmarks: the train step (FLOPs, MFU, memory), the comparison with transformers, loader speed."""
