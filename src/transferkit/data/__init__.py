"""Data: readers for image folders, CSV manifests and built-in datasets; seeded splits; transforms.

``read_dataset`` gives a ``LabelledImages`` (items, integer labels, class names in order, skipped files);
``split_dataset`` gives seeded, stratified train/val/test index arrays; ``ImageDataset`` turns items into
tensors with the source's preprocessing.
"""

from transferkit.data.images import (
    DATASETS,
    ImageDataset,
    LabelledImages,
    build_transform,
    check_dataset_spec,
    load_image,
    read_dataset,
)
from transferkit.data.split import Splits, split_dataset

__all__ = ["DATASETS", "ImageDataset", "LabelledImages", "Splits", "build_transform", "check_dataset_spec",
           "load_image", "read_dataset", "split_dataset"]
