"""Data: readers for image folders, CSV manifests, text files and built-in datasets; seeded splits; transforms.

``read_dataset`` gives a ``Labelled`` (items, integer labels, class names in order, skipped items, modality);
``split_dataset`` gives seeded, stratified train/val/test index arrays; ``ImageDataset`` and ``TextDataset`` turn
items into model inputs with the source's preprocessing (transforms, tokenizer).
"""

from transferkit.data.audio import AudioDataset, FramesDataset, read_audio_folder
from transferkit.data.images import (
    DATASETS,
    ImageDataset,
    LabelledImages,
    build_transform,
    check_dataset_spec,
    load_image,
    read_dataset,
)
from transferkit.data.split import Labelled, Splits, split_dataset
from transferkit.data.text import TextDataset, read_text_file

__all__ = [
    "DATASETS",
    "AudioDataset",
    "FramesDataset",
    "ImageDataset",
    "Labelled",
    "LabelledImages",
    "Splits",
    "TextDataset",
    "build_transform",
    "check_dataset_spec",
    "load_image",
    "read_audio_folder",
    "read_dataset",
    "read_text_file",
    "split_dataset",
]
