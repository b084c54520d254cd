"""Weights and files on disk, beneath everything: safetensors headers and tensors, the hub, model specs, output folders, and the tiny seeded models tests and the quick start build."""
