"""Compression and export of a trained model: structured pruning (``prune``), int8 quantization (``quantize``) and
ONNX export checked against PyTorch (``export``); each is a plain function and a stage of a run."""
