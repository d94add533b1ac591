"""Data: the modality registry, readers for image folders, CSV manifests, text files, audio folders and built-in
datasets; seeded splits; the prepared data of a run.

``read_dataset`` gives a ``Labelled`` (items, integer labels, class names in order, skipped items, modality);
``split_dataset`` gives seeded, stratified train/val/test index arrays; ``prepare_data`` does both and takes the
preprocessing from the source. Each modality (``images``, ``text``, ``audio``) registers its hooks in
``data.modality`` when this package is imported.
"""

from transferkit.data import audio, images, text  # noqa: F401  (registration: every modality and built-in dataset)
from transferkit.data.audio import AudioDataset, FramesDataset, read_audio_folder
from transferkit.data.gpu_images import (
    TensorAugment,
    TensorImageDataset,
    Uint8Cache,
    choose_input,
    decode_jpegs,
    resize_boxes,
)
from transferkit.data.images import ImageDataset, LabelledImages, build_transform, load_image
from transferkit.data.modality import (
    DATASETS,
    check_classes_spec,
    check_dataset_spec,
    check_unlabelled_spec,
    dataset_modality,
    get_modality,
    make_batch,
    make_dataset,
    read_dataset,
    read_unlabelled,
)
from transferkit.data.prepare import Pool, PreparedData, prepare_data
from transferkit.data.split import Labelled, Splits, split_dataset
from transferkit.data.text import TextDataset, read_text_file

__all__ = [
    "DATASETS",
    "AudioDataset",
    "FramesDataset",
    "ImageDataset",
    "Labelled",
    "LabelledImages",
    "Pool",
    "PreparedData",
    "Splits",
    "TensorAugment",
    "TensorImageDataset",
    "TextDataset",
    "Uint8Cache",
    "build_transform",
    "check_classes_spec",
    "check_dataset_spec",
    "check_unlabelled_spec",
    "choose_input",
    "dataset_modality",
    "decode_jpegs",
    "get_modality",
    "load_image",
    "make_batch",
    "make_dataset",
    "prepare_data",
    "read_audio_folder",
    "read_dataset",
    "read_text_file",
    "read_unlabelled",
    "resize_boxes",
    "split_dataset",
]
