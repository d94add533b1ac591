"""The recipe's schema: one YAML file that describes a whole run, as pydantic models (no torch, no runtime).

``transferkit.recipe.load_recipe`` reads YAML, applies ``key.path=value`` overrides and validates everything at once
(these schemas and every stage's own checks): every problem is reported with its key path, the bad value and the
valid choices, not only the first one.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from transferkit.config.recsys import RecsysConfig
from transferkit.config.transfer import TransferConfig
from transferkit.config.tts import TtsConfig
from transferkit.errors import RecipeError, did_you_mean
from transferkit.specs import spec_name, split_spec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


MAX_IMAGE_SIZE = 4096  # pixels a side: 3 x 4096 x 4096 float32 is 200 MB per image already
MAX_SEED = 2**64 - 1  # torch.manual_seed takes at most this; numpy's generators refuse negative seeds


def _check_seed(v: int | None) -> int | None:
    """A seed numpy and torch both accept: the run would otherwise fail when it first seeds, after validation."""
    if v is not None and not 0 <= v <= MAX_SEED:
        raise ValueError("a seed is an integer from 0 to 2**64-1 (numpy refuses negative seeds, torch larger ones)")
    return v


class SourceSpec(_Strict):
    """Where the pretrained weights come from.

    ``name`` is ``timm:NAME``, ``hf:NAME_OR_FOLDER``, ``torchvision:NAME``, a path to a weights file or a
    transferkit model folder, or a built-in name (``transferkit ls``).
    """

    name: str
    pretrained: bool = True
    weights: str | None = Field(default=None, description="local weights file for a timm/torchvision architecture")


class AugmentConfig(_Strict):
    """Training-time augmentation; off by default (no flips: digits and text do not survive them)."""

    random_resized_crop: tuple[float, float] | None = Field(default=None, description="scale range, e.g. [0.8, 1.0]")
    hflip: bool = False
    rotation: float = Field(default=0.0, ge=0, le=180)
    translate: float = Field(default=0.0, ge=0, le=0.5)
    color_jitter: float = Field(default=0.0, ge=0, le=1)

    @property
    def enabled(self) -> bool:
        return bool(self.random_resized_crop or self.hflip or self.rotation or self.translate or self.color_jitter)


class DataConfig(_Strict):
    """Which data, how it is split and prepared."""

    dataset: str = Field(
        description="built-in name (transferkit ls); images: a folder or a CSV manifest path,label; "
        "text: a CSV, JSONL or Parquet file"
    )
    per_class: int | None = Field(default=None, ge=1, description="labelled training examples kept per class")
    val_per_class: int | None = Field(default=None, ge=1, description="validation examples per class")
    val_fraction: float = Field(default=0.1, gt=0, lt=1, description="used when val_per_class is not set")
    test_size: float = Field(default=0.2, gt=0, description="held-out test examples: a count (>=1) or a fraction")
    image_size: int | None = Field(default=None, ge=8, description="default: the source's own input size")
    classes: list[str] | None = Field(
        default=None,
        min_length=2,
        description="keep only these classes, in this order (e.g. a source task on digits 0-4, a target task on 5-9)",
    )
    text_column: str = Field(default="text", description="text data: the column holding the text")
    label_column: str = Field(default="label", description="text data: the column holding the label")
    max_length: int | None = Field(
        default=None, ge=2, description="text: tokens kept per text (default 128, at most the source's limit)"
    )
    unlabelled: str | None = Field(
        default=None,
        description="a pool of unlabelled examples: rest = the dataset's examples outside the labelled train, "
        "validation and test splits (their labels ignored for training; the test split is never touched); or a "
        "path: a folder of images / audio recordings (searched recursively; sub-folders need not be classes), or "
        "for text a .txt file (one text per line) or a CSV/JSONL/Parquet file read with data.text_column (a label "
        "column, if any, is ignored)",
    )
    unlabelled_max: int | None = Field(
        default=None,
        ge=1,
        description="keep at most this many pool examples (a fixed random subset: the same for the same pool)",
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    strict: bool = Field(default=False, description="error on a corrupt image or an empty text instead of skipping it")
    num_workers: int = Field(default=0, ge=0)
    input: Literal["auto", "pil", "gpu"] = Field(
        default="auto",
        description="training images: pil (decode and augment per image in DataLoader workers), gpu (batched "
        "decode_jpeg and tensor augmentation on the training device, with a uint8 cache; also runs on a CPU), auto: "
        "gpu on a CUDA device when the augmentation is only random_resized_crop and hflip, else pil",
    )

    @field_validator("image_size")
    @classmethod
    def _image_size_fits(cls, v: int | None) -> int | None:
        if v is not None and v > MAX_IMAGE_SIZE:
            raise ValueError(
                f"{v} pixels a side is over the limit of {MAX_IMAGE_SIZE}: one RGB image of that size is "
                f"{3 * v * v * 4 / 1e9:,.1f} GB as float32 before a batch or the network sees it. Leave image_size "
                f"unset (the source's own size) or give at most {MAX_IMAGE_SIZE}"
            )
        return v


class TrainConfig(_Strict):
    """How the target is trained. ``strategy`` is a name or ``{name: ..., option: value}``."""

    strategy: str | dict[str, Any] = "full"
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=32, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0, description="learning rate of the head (strategies scale the backbone's)")
    weight_decay: float = Field(default=0.01, ge=0)
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(default=0.0, ge=0)
    grad_accum: int = Field(default=1, ge=1)
    max_grad_norm: float | None = Field(default=None, gt=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    regularizer: str | dict[str, Any] | None = Field(
        default=None, description="a penalty added to any strategy, e.g. {name: l2sp, alpha: 0.01} (transferkit ls)"
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    monitor: Literal["val_accuracy", "val_macro_f1", "val_loss"] = "val_accuracy"
    early_stopping_patience: int | None = Field(default=None, ge=1, description="epochs without improvement")
    checkpoint_every: int = Field(default=0, ge=0, description="optimizer steps between checkpoints; 0 = each epoch")
    checkpoints: Literal["until_done", "keep"] = Field(
        default="until_done",
        description="until_done: a model's resume checkpoints (last.pt, with the optimizer state) are deleted once "
        "it is trained and saved (an interrupted model keeps its own and resumes); keep: kept after training",
    )
    log_every: int = Field(default=10, ge=1)
    compile: bool = Field(default=False, description="torch.compile the model for training (compile time reported)")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        default="auto",
        description="recompute activations in the backward pass to save memory (timm and transformers backbones); "
        "auto: on for backbones over 300M parameters on a GPU, off on a CPU",
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU threads of torch while training (default: "
        "torch's own); small models (GRUs, towers) often train faster on 1",
    )
    seed: int | None = Field(
        default=None,
        description="the seed of this model's data order, dropout and augmentation (default: the recipe's seed; "
        "the split and the new head's initialisation keep the recipe's), e.g. fine-tunes for a soup",
    )

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, v: int | None) -> int | None:
        return _check_seed(v)

    @property
    def strategy_name(self) -> str:
        return spec_name(self.strategy)

    @property
    def strategy_options(self) -> dict[str, Any]:
        return split_spec(self.strategy, "strategy")[1] if spec_name(self.strategy) else {}


class CompareEntry(_Strict):
    """A baseline trained in the same run with the same budget: a strategy plus optional train overrides."""

    strategy: str | dict[str, Any]
    label: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.label or spec_name(self.strategy)


class EvaluateConfig(_Strict):
    """Evaluate every trained model on another labelled dataset: a shifted domain, a second test set."""

    dataset: str = Field(
        description="a built-in name or a path, read as data.dataset is (its classes must be among the models' labels)"
    )
    label: str | None = Field(
        default=None, description="the evaluation's name in metrics.json (default: the dataset's file or folder name)"
    )
    text_column: str = "text"
    label_column: str = "label"
    strict: bool = False

    @property
    def name(self) -> str:
        return self.label or Path(self.dataset).stem or self.dataset


class MergeEntry(_Strict):
    """Several trained models merged into one (or an output ensemble), evaluated like a trained model."""

    method: str | dict[str, Any] = Field(
        default="uniform_soup",
        description="uniform_soup | greedy_soup | task_arithmetic | ties | dare | ensemble, "
        "or {name: ties, density: 0.2, lam: 0.5} (transferkit ls)",
    )
    models: list[str] = Field(default_factory=list, description="models this run trained (default: all of them)")
    runs: list[str] = Field(default_factory=list, description="other run directories: their selected model joins")
    label: str | None = Field(default=None, description="the merged model's name (default: merge-METHOD)")
    recalibrate_bn: bool = Field(default=True, description="recompute BatchNorm statistics on the training split")
    lora: Literal["fold", "adapters"] = Field(
        default="fold",
        description="members that kept LoRA adapters: fold them into plain weights first (fold), or merge the "
        "adapters themselves through peft into a LoRA model (adapters: every member a LoRA run of one base, rank "
        "and target modules)",
    )
    lora_combination: (
        Literal[
            "cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties", "dare_ties_svd"
        ]
        | None
    ) = Field(
        default=None,
        description="with lora: adapters, peft's combination_type: cat, linear or svd for soups and task arithmetic "
        "(default cat, exact), ties or ties_svd for TIES (default ties_svd), dare_linear(_svd) or dare_ties(_svd) "
        "for DARE (default the _svd one)",
    )
    lora_rank: int | None = Field(
        default=None, ge=1, description="the rank of an SVD combination's adapter (default: the members' ranks summed)"
    )
    refit_heads: bool = Field(
        default=False,
        description="after the merge (and BatchNorm recalibration), refit each task's head by a linear probe on the "
        "merged backbone's features of that task's training split",
    )
    refit_train: dict[str, Any] = Field(
        default_factory=dict, description="the head refit's train settings over train: (strategy linear_probe)"
    )

    @model_validator(mode="after")
    def _lora_options_need_adapters(self) -> MergeEntry:
        given = [k for k in ("lora_combination", "lora_rank") if getattr(self, k) is not None]
        if given and self.lora != "adapters":
            raise ValueError(
                f"{', '.join(given)} apply to lora: adapters (a merge of the adapters); set lora: adapters"
            )
        if self.refit_train and not self.refit_heads:
            raise ValueError("refit_train sets the head refit's training: set refit_heads: true too")
        return self

    @property
    def name(self) -> str:
        return self.label or f"merge-{spec_name(self.method)}"


class DistillEntry(_Strict):
    """A student trained from a teacher on the labelled split and the unlabelled pool (``data.unlabelled``).

    The teacher is a model of this run (``teacher``, default the main model), the selected models of other runs
    (``teacher_runs``: several give the mean of their probabilities) or a source whose head predicts the data's
    classes (``teacher_source``). The student is a source (``student``: another architecture, pretrained or not),
    a copy of the teacher changed by the transfer machinery (``student_transfer``: fewer layers, another width),
    or by default the run's own target (the source with a new head).
    """

    teacher: str | None = Field(default=None, description="a model of this run (default: the main model)")
    teacher_runs: list[str] = Field(default_factory=list, description="run directories: their selected models teach")
    teacher_source: SourceSpec | None = Field(default=None, description="a source whose head predicts the classes")
    student: SourceSpec | None = Field(default=None, description="the student's source (default: the run's target)")
    student_transfer: TransferConfig | None = Field(
        default=None,
        description="the student built from the teacher by the transfer machinery, e.g. "
        "{kwargs: {num_hidden_layers: 3}, source_blocks: every_other}",
    )
    loss: str | dict[str, Any] = Field(
        default="kd",
        description="kd | dkd | hint | pseudo_label, or {name: kd, temperature: 4, alpha: 0.9} (transferkit ls)",
    )
    unlabelled: bool = Field(default=True, description="train on data.unlabelled too, when the data has a pool")
    rounds: int = Field(default=1, ge=1, description="more than 1: each round's student teaches the next")
    train: dict[str, Any] = Field(default_factory=dict, description="the student's train settings over train:")
    label: str | None = Field(default=None, description="the student's name (default: distill-LOSS)")

    @field_validator("student", "teacher_source", mode="before")
    @classmethod
    def _spec_from_string(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_teacher_one_student(self) -> DistillEntry:
        given = [k for k in ("teacher", "teacher_runs", "teacher_source") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give one teacher: {', '.join(given)} are all set")
        if self.student is not None and self.student_transfer is not None:
            raise ValueError("give student (a source) or student_transfer (built from the teacher), not both")
        return self

    @property
    def name(self) -> str:
        return self.label or f"distill-{spec_name(self.loss)}"


class PruneConfig(_Strict):
    """Structured pruning (torch-pruning's DepGraph) of a trained model, then recovery fine-tuning.

    Whole channels (and, in a transformer text encoder, whole attention heads and FFN channels) are removed, so the
    pruned model is smaller and faster, not only sparse. The channel counts are recorded in ``model.json``: the
    pruned model reloads from its folder alone.
    """

    model: str | None = Field(
        default=None, description="the model to prune (default: the last distilled student, else the main model)"
    )
    ratio: float | None = Field(default=None, gt=0, lt=1, description="fraction of channels removed per layer")
    macs: float | None = Field(default=None, gt=0, description="instead of ratio: prune until MACs <= this count")
    importance: Literal["magnitude", "taylor"] = Field(
        default="magnitude", description="which channels go: smallest L2 norm, or smallest first-order loss change"
    )
    round_to: int | None = Field(default=8, ge=1, description="channel counts kept at multiples of this")
    keep: list[str] = Field(
        default_factory=list, description="regexes of module names never pruned (the head never is)"
    )
    recovery: dict[str, Any] | None = Field(
        default_factory=dict,
        description="fine-tuning after pruning: train settings over train: (default strategy full); null: none",
    )
    distill: str | dict[str, Any] | None = Field(
        default=None,
        description="recover by distillation from the model before pruning: kd | dkd | ... (transferkit ls), on "
        "the labels and data.unlabelled",
    )
    label: str | None = Field(default=None, description="the pruned model's name (default: MODEL-pruned)")

    @model_validator(mode="after")
    def _ratio_or_macs(self) -> PruneConfig:
        if (self.ratio is None) == (self.macs is None):
            raise ValueError("give one of ratio (e.g. 0.5: half the channels) or macs (a target MAC count), not both")
        if self.distill is not None and self.recovery is None:
            raise ValueError("distill: is how the recovery trains; with recovery: null there is none to distill")
        return self


class QuantizeConfig(_Strict):
    """int8 quantization of a trained model for PyTorch inference (torchao); saved in ``models/NAME/``."""

    model: str | None = Field(default=None, description="the model to quantize (default: the pruned one, if any)")
    method: Literal["auto", "int8_dynamic", "int8_static", "int8_weight_only"] = Field(
        default="auto", description="auto: int8_dynamic for text and audio encoders, int8_static for conv nets"
    )
    calibration: int = Field(default=256, ge=1, description="training examples that calibrate a static method")
    label: str | None = Field(default=None, description="the quantized model's name (default: MODEL-int8)")


class ExportConfig(_Strict):
    """ONNX export, checked against PyTorch at export time, optionally int8-quantized for ONNX Runtime.

    Writes ``exports/NAME/`` (``model.onnx``, ``model.json``, the tokenizer, ``export_report.json``), which
    ``transferkit predict`` runs with ONNX Runtime, without torch; with ``quantize``, also ``exports/NAME-int8/``.
    """

    model: str | None = Field(default=None, description="the model to export (default: the pruned one, if any)")
    format: Literal["onnx"] = "onnx"
    opset: int | None = Field(default=None, ge=7, description="ONNX opset (default: the exporter's)")
    atol: float = Field(default=1e-4, gt=0, description="largest logit difference allowed, relative to the largest")
    quantize: Literal["int8", "int8_dynamic", "int8_static"] | None = Field(
        default=None, description="also an ONNX Runtime int8 copy (int8: dynamic for text/audio, static for images)"
    )
    per_channel: bool = Field(default=True, description="int8 weights scaled per output channel")
    calibration: int = Field(default=256, ge=1, description="training examples that calibrate static int8")
    check_examples: int = Field(default=256, ge=1, description="validation examples the parity check runs on")
    label: str | None = Field(default=None, description="the export's folder name (default: MODEL-onnx)")


class RankConfig(_Strict):
    """Rank candidate sources before training; the best one becomes the run's source."""

    candidates: list[SourceSpec] = Field(min_length=1)
    score: str = Field(default="logme", description="logme | leep | nce | hscore | hscore_shrinkage")
    max_examples: int | None = Field(default=None, ge=1)

    @field_validator("candidates", mode="before")
    @classmethod
    def _candidates_from_strings(cls, v: Any) -> Any:
        return [{"name": c} if isinstance(c, str) else c for c in v] if isinstance(v, list) else v


_PRETRAIN_STRATEGY = {"name": "full", "backbone_lr_scale": 1.0}


class PretrainConfig(_Strict):
    """Train the source network on its own (source) task first; ``train``/``compare`` then start from it.

    ``train`` defaults to full training with every weight at the same rate (``backbone_lr_scale: 1``): a source
    pretrained here usually starts from random weights (``source: {name: ..., pretrained: false}``).
    """

    data: DataConfig
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(strategy=dict(_PRETRAIN_STRATEGY)))

    @field_validator("train", mode="before")
    @classmethod
    def _default_strategy(cls, v: Any) -> Any:
        return {"strategy": dict(_PRETRAIN_STRATEGY), **v} if isinstance(v, dict) and "strategy" not in v else v


class Recipe(_Strict):
    """A whole run. With ``rank:``, ``source`` may be left out: the best-ranked candidate is used.

    The order in which the recipe's keys are written is kept (``written``): the stages run in that order, each after
    the stages whose outputs it reads (``transferkit.stages.stage_order``).
    """

    _written: list[str] = PrivateAttr(default_factory=list)

    name: str = "run"
    seed: int = 0
    source: SourceSpec | None = None
    rank: RankConfig | None = None
    pretrain: PretrainConfig | None = None
    transfer: TransferConfig | None = Field(
        default=None,
        description="build the target from the source by the "
        "transfer machinery: another architecture, in_chans, img_size, rules...",
    )
    data: DataConfig | None = Field(default=None, description="required, except with recsys: or tts:")
    train: TrainConfig = Field(default_factory=TrainConfig)
    compare: list[CompareEntry] = Field(default_factory=list)
    baselines: list[str] = Field(
        default_factory=list,
        description="computed on the same splits without the source, e.g. [tfidf] for text (transferkit ls)",
    )
    evaluate: list[EvaluateConfig] = Field(
        default_factory=list, description="after training, every model evaluated on each of these datasets too"
    )
    merge: list[MergeEntry] = Field(
        default_factory=list, description="after training, models merged into one (soups, TIES, DARE) or ensembled"
    )
    distill: list[DistillEntry] = Field(
        default_factory=list, description="students trained from a teacher on the labels and the unlabelled pool"
    )
    prune: PruneConfig | None = Field(default=None, description="structured pruning and recovery of a trained model")
    quantize: QuantizeConfig | None = Field(default=None, description="int8 quantization for PyTorch inference")
    export: ExportConfig | None = Field(default=None, description="ONNX export checked against PyTorch (and int8)")
    tts: TtsConfig | None = Field(
        default=None,
        description="speech synthesis: a pretrained VITS voice adapted to the speaker of tts.data; data:/source: "
        "are then not used",
    )
    recsys: RecsysConfig | None = Field(
        default=None,
        description="a recommendation task (interactions, two-tower or "
        "MF model, transfer from source_run); data:/source: are then not used",
    )

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, v: int) -> int:
        _check_seed(v)
        return v

    @model_validator(mode="wrap")
    @classmethod
    def _keep_written_order(cls, data: Any, handler: Any) -> Recipe:
        recipe = handler(data)
        if isinstance(data, Recipe):
            recipe._written = list(data._written)
        else:
            keys = [str(k) for k in data] if isinstance(data, dict) else []
            recipe._written = keys + [k for k in cls.model_fields if k not in keys]
        return recipe

    @property
    def written(self) -> list[str]:
        """Every top-level key: those the recipe writes, in its order, then the others in the schema's order."""
        return list(self._written)

    @model_validator(mode="after")
    def _data_unless_recsys(self) -> Recipe:
        if self.recsys is not None and self.tts is not None:
            raise ValueError("recsys: and tts: are tasks of their own: give one of them per recipe")
        if self.recsys is None and self.tts is None:
            if self.data is None:
                raise ValueError("data: required key is missing.")
            return self
        used = [k for k in ("data", "source", "rank", "pretrain", "transfer") if getattr(self, k) is not None]
        used += [k for k in ("compare", "baselines", "evaluate", "merge", "distill") if getattr(self, k)]
        used += [k for k in ("prune", "quantize", "export") if getattr(self, k) is not None]
        if used and self.recsys is not None:
            raise ValueError(
                f"recsys: runs a recommendation task on its own; {', '.join(used)} "
                f"{'is' if len(used) == 1 else 'are'} not used with it (put the source model in "
                "recsys.source_run and the baselines in recsys.baselines)"
            )
        if used:
            raise ValueError(
                f"tts: adapts a voice on its own; {', '.join(used)} {'is' if len(used) == 1 else 'are'} not used "
                "with it (the recordings go in tts.data, the pretrained voice in tts.voice)"
            )
        return self

    @field_validator("source", mode="before")
    @classmethod
    def _source_from_string(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v: str) -> str:
        if not v.strip() or v in (".", "..") or "/" in v or "\\" in v or "\0" in v:
            raise ValueError(
                "the run's name is its folder under runs/ (when --out is not given), so it must be a plain folder "
                "name such as 'mnist-lite0': no '/', '\\', and not '.' or '..' (to write elsewhere, pass --out DIR)"
            )
        return v

    @field_validator("compare", mode="before")
    @classmethod
    def _compare_from_strings(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"strategy": e} if isinstance(e, str) else e for e in v]
        return v

    @model_validator(mode="after")
    def _pretrain_needs_one_source(self) -> Recipe:
        if self.pretrain is not None and self.rank is not None:
            raise ValueError("pretrain: trains the recipe's source, rank: chooses among candidates; use one of them")
        if self.pretrain is not None and self.source is None:
            raise ValueError(
                "pretrain: needs source: the architecture to train, e.g. {name: timm:resnet18, pretrained: false}"
            )
        return self

    @model_validator(mode="after")
    def _one_image_size(self) -> Recipe:
        size = self.transfer.img_size if self.transfer else None
        if size and self.data is not None and self.data.image_size and size != self.data.image_size:
            raise ValueError(
                f"transfer.img_size={size} builds the target for {size} px but data.image_size="
                f"{self.data.image_size}; set one of them (or both to the same size)"
            )
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> Recipe:
        names = [self.train.strategy_name] + [c.name for c in self.compare] + [d.name for d in self.distill]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"trained models need distinct names; {dup} appear twice (give compare entries a label)")
        return self

    def trainings(self) -> list[tuple[str, TrainConfig]]:
        """The models this run trains: the main one first, then the comparisons, each with its TrainConfig."""
        out = [(self.train.strategy_name, self.train)]
        for c in self.compare:
            cfg = self.train.model_dump()
            cfg.update(c.overrides)
            cfg["strategy"] = c.strategy
            out.append((c.name, TrainConfig(**cfg)))
        return out


def fields_at(model: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    """Valid field names of the sub-model at ``path`` (for 'did you mean')."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = None
        for c in candidates:
            for inner in (c, *getattr(c, "__args__", ())):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    nxt = inner
        if nxt is None:
            return []
        current = nxt
    return list(getattr(current, "model_fields", {}))


def format_error(err: Mapping[str, Any], root: type[BaseModel] | None = None) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    key = ".".join(str(p) for p in loc) or "(recipe)"
    if err["type"] == "extra_forbidden":
        valid = fields_at(root or Recipe, loc[:-1])
        return f"{key}: unknown key.{did_you_mean(str(loc[-1]), valid)} Valid keys here: {', '.join(valid)}."
    if err["type"] == "missing":
        return f"{key}: required key is missing."
    msg = err["msg"].removeprefix("Value error, ")
    if not loc and msg.endswith("required key is missing."):  # a key required only in some recipes (data:)
        return msg
    return f"{key}: {msg}" if not loc else f"{key}: {msg} (got {err.get('input')!r})"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.lr=0.01'`` -> (['train', 'lr'], 0.01); values are parsed as YAML."""
    if "=" not in text:
        raise RecipeError(f"override '{text}' is not of the form key.path=value (e.g. train.epochs=5)")
    key, value = text.split("=", 1)
    return key.strip().split("."), load_yaml(value, f"override '{text}'") if value.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``key.path=value`` overrides in a copy of ``raw``; list items are addressed by index (compare.0.label)."""
    data = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        try:
            _set_path(data, path, value)
        except (IndexError, ValueError, TypeError) as e:
            raise RecipeError(f"override '{text}' does not fit the recipe: {e}") from e
    return data


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node: Any = data
    for depth, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[_index(part, node)]
            continue
        child = node.get(part)
        if child is None:
            node[part] = child = {}
        elif isinstance(child, str) and depth == 0 and part in ("source",):
            node[part] = child = {"name": child}  # source: NAME, then source.pretrained=false
        elif not isinstance(child, (dict, list)):
            raise TypeError(f"'{'.'.join(path[: depth + 1])}' is a value ({child!r}), not a section with keys")
        node = child
    if isinstance(node, list):
        node[_index(path[-1], node)] = value
    else:
        node[path[-1]] = value


def _index(part: str, items: list[Any]) -> int:
    if not part.lstrip("-").isdigit():
        raise ValueError(f"'{part}' is not a list index (the list has items 0..{len(items) - 1})")
    i = int(part)
    if not -len(items) <= i < len(items):
        raise IndexError(f"index {i} is out of range (the list has items 0..{len(items) - 1})")
    return i


MAX_RECIPE_NODES = 100_000  # keys, values and list items of a recipe, aliases expanded (a real one has hundreds)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, again: int):
        self.key, self.first, self.again = key, first, again


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base': its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                continue
            seen[key] = line
        return super().construct_mapping(node, deep)


def _expanded_size(obj: Any, sizes: dict[int, int]) -> int:
    """Keys, values and items of ``obj`` counted as if every alias were written out (each container counted once:
    a few hundred bytes of nested aliases, a "billion laughs", are counted without being expanded)."""
    if not isinstance(obj, (dict, list)):
        return 1
    if id(obj) in sizes:
        if sizes[id(obj)] < 0:
            raise RecipeError("an alias (*name) refers to the mapping or list that holds it; a recipe cannot be cyclic")
        return sizes[id(obj)]
    sizes[id(obj)] = -1  # in progress
    items = [x for kv in obj.items() for x in kv] if isinstance(obj, dict) else obj
    sizes[id(obj)] = min(1 + sum(_expanded_size(x, sizes) for x in items), MAX_RECIPE_NODES + 1)
    return sizes[id(obj)]


def _unshared(obj: Any) -> Any:
    """A copy in which each alias is a copy of its anchor's value (an override then changes one place only)."""
    if isinstance(obj, dict):
        return {k: _unshared(v) for k, v in obj.items()}
    return [_unshared(x) for x in obj] if isinstance(obj, list) else obj


def load_yaml(text: str, where: str) -> Any:
    """Parse recipe YAML safely: a key given twice in one mapping, a cyclic alias or aliases that expand to more than
    ``MAX_RECIPE_NODES`` values are a RecipeError; ``where`` names the text in messages (e.g. "recipe 'r.yaml'")."""
    try:
        raw = yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: tags that build objects are refused
    except _DuplicateKey as e:
        raise RecipeError(
            f"{where}, line {e.again}: the key '{e.key}' is given twice in the same mapping (first on line "
            f"{e.first}); YAML would silently keep only the last one. Remove one of them."
        ) from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{where} is not valid YAML: {e}") from e
    except RecursionError:
        raise RecipeError(f"{where} nests lists or mappings too deeply to be a recipe") from None
    if _expanded_size(raw, {}) > MAX_RECIPE_NODES:
        raise RecipeError(
            f"{where}: its aliases (*name) expand to more than {MAX_RECIPE_NODES:,} values (a YAML alias bomb?); "
            "a recipe is a few hundred: write the values out, or use fewer nested aliases"
        )
    return _unshared(raw)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file '{p}' does not exist; pass the path of a YAML recipe (see recipes/)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(
            f"recipe '{p}' is not a UTF-8 text file ({e.reason} at byte {e.start}); give a YAML recipe"
        ) from None
    raw = load_yaml(text, f"recipe '{p}'")
    if not isinstance(raw, dict):
        raise RecipeError(
            f"recipe '{p}' must be a mapping of keys (source:, data:, train:...), not {type(raw).__name__}"
        )
    return raw


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (defaults filled in), its keys in the order they were written, then the rest
    (reading it back gives the same recipe, stage order included)."""
    raw = recipe.model_dump(mode="json")
    return yaml.safe_dump({k: raw[k] for k in recipe.written}, sort_keys=False)
