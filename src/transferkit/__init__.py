"""transferkit: transfer learning on PyTorch, from a pretrained source to a new task."""

__version__ = "0.1.0"
