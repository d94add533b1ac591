"""Weight matching: which source tensor initialises which target tensor.

Three passes, tried in order, each switchable (``methods``) and recorded for the report:

1. ``names``: identical names once wrapper prefixes are stripped (``module.`` from DDP, ``_orig_mod.`` from
   torch.compile, ``model.``, ``backbone.``, ``encoder.``);
2. ``rules``: the user's regex renames (``{"from": r"^features\\.(\\d+)", "to": r"blocks.\\1"}``), applied in order
   to the normalised source names, then matched by name; a rule that matches no source name is an error;
3. ``structure``: the two ordered lists of (role, shape) still unmatched are aligned with a global sequence
   alignment (Needleman-Wunsch), so inserted and removed layers are skipped rather than shifting every later
   pairing. A tensor whose name carries no role (an exporter's counter such as ONNX's ``onnx::Conv_193``, keys
   like ``w0001``) pairs by its shape and its place alone: the report marks such pairs ``order`` and says what
   the shape makes the tensor (``shape_role``); where the order leaves a choice it is an ambiguity as any other.
   When both sides expose layer groups (blocks), groups are aligned first, scored by the best alignment of their
   tensors, and tensors are then aligned inside each paired group.

An alignment is *ambiguous* where another alignment with the same best score pairs a target tensor differently
(e.g. a 2-block stage into a 3-block stage: which target block stays fresh?). The choice is then deterministic
(source blocks go to the earliest target blocks, so extra target blocks come last, where identity blocks
preserve the function) and always reported; ``strict=True`` turns it into an error.

The matcher works on names and shapes only; whether a pair with different shapes can be adapted is decided by the
``adaptable`` predicate the caller passes (see ``transferkit.transfer.api``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from transferkit.errors import RecipeError, TransferKitError

PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.")
METHODS = ("names", "rules", "structure")
EXACT, ADAPTED = 2, 1  # alignment scores: a same-shape pair beats one that needs surgery

Shape = tuple[int, ...]
Adaptable = Callable[[str, Shape, str, Shape], bool]


class TransferError(TransferKitError, ValueError):
    """Weights cannot be moved: nothing in common, an ambiguous alignment under strict, a shape that cannot adapt."""


@dataclass
class MatchResult:
    """What the matcher decided.

    Attributes:
        pairs: target name -> (source name, method) where method is names, rules or structure.
        ambiguities: one entry per target tensor or group with several equally good choices:
            ``{"level": "tensor"|"group", "target": ..., "chosen": ..., "candidates": [...]}``
            (``None`` in chosen/candidates means "left unmatched").
        unused_source: source tensors no target tensor took.
        methods: the passes that ran.
    """

    pairs: dict[str, tuple[str, str]] = field(default_factory=dict)
    ambiguities: list[dict[str, Any]] = field(default_factory=list)
    unused_source: list[str] = field(default_factory=list)
    methods: tuple[str, ...] = METHODS

    def counts(self) -> dict[str, int]:
        """Pairs found by each pass."""
        out = dict.fromkeys(self.methods, 0)
        for _, method in self.pairs.values():
            out[method] = out.get(method, 0) + 1
        return out


def normalize(name: str, prefixes: Sequence[str] = PREFIXES) -> str:
    """Strip wrapper prefixes, repeatedly (``module._orig_mod.backbone.x`` -> ``x``)."""
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if name.startswith(p) and len(name) > len(p):
                name, changed = name[len(p) :], True
    return name


def _index(names: Sequence[str], rename: Callable[[str], str]) -> dict[str, str]:
    """{renamed: original}; names whose renaming collides keep their original name (never silently merged)."""
    renamed: dict[str, list[str]] = {}
    for n in names:
        renamed.setdefault(rename(n), []).append(n)
    out: dict[str, str] = {}
    for key, originals in renamed.items():
        if len(originals) == 1:
            out[key] = originals[0]
        else:
            out.update({o: o for o in originals})
    return out


def compile_rules(rules: Sequence[Mapping[str, str] | Sequence[str]] | None) -> list[tuple[re.Pattern[str], str]]:
    """Validate rename rules (``{"from": regex, "to": replacement}`` or ``(regex, replacement)``)."""
    out = []
    for i, rule in enumerate(rules or []):
        if isinstance(rule, Mapping):
            if set(rule) != {"from", "to"}:
                raise RecipeError(f"transfer rule {i} {dict(rule)} must have exactly the keys 'from' and 'to'")
            pattern, repl = rule["from"], rule["to"]
        else:
            pattern, repl = rule
        try:
            out.append((re.compile(pattern), repl))
        except re.error as e:
            raise RecipeError(f"transfer rule {i} ({pattern!r} -> {repl!r}) is not a valid regex: {e}") from e
    return out


def apply_rules(names: Sequence[str], rules: Sequence[Mapping[str, str] | Sequence[str]] | None) -> dict[str, str]:
    """Apply the rename rules, in order, to ``names``: {name: renamed}.

    Raises:
        RecipeError: a rule's regex matches none of the names it is applied to (a typo, or the wrong model),
            naming the rule and a few of the names it was tried on.
    """
    compiled = compile_rules(rules)
    current = {n: n for n in names}
    for i, (rx, repl) in enumerate(compiled):
        hits = [n for n, cur in current.items() if rx.search(cur)]
        if not hits:
            sample = ", ".join(list(current.values())[:4])
            raise RecipeError(
                f"transfer rule {i} ({rx.pattern!r} -> {repl!r}) matches no source tensor name "
                f"(names look like: {sample})"
            )
        for n in hits:
            current[n] = rx.sub(repl, current[n])
    return current


# a name that says nothing of what the tensor does: an exporter's counter (ONNX initializers ``onnx::Conv_193``,
# ``onnx::MatMul_12``), a bare numbered key (``w0001``, ``p12``, ``193``)
_UNINFORMATIVE = re.compile(r"^(?:onnx::)?[A-Za-z]{0,16}[_:]?\d+$")
UNKNOWN = "?"  # the role of a tensor whose name carries none: inferred from its shape and its place


def uninformative(name: str) -> bool:
    """Whether ``name`` carries no role: its last part is a counter such as ``onnx::Conv_193`` or ``w0001``."""
    return bool(_UNINFORMATIVE.match(name.rsplit(".", 1)[-1] if "::" not in name else name))


def role(name: str, shape: Shape) -> tuple[str, int]:
    """What a tensor does, as far as names and shapes tell across implementations: last name part and rank.

    ``_bn0.weight`` and ``bn1.weight`` (rank 1) are both norm scales; a 4-D ``weight`` is a convolution kernel. A
    name that carries no role (``uninformative``) gives ``UNKNOWN``: only its shape and its place can pair it.
    """
    if uninformative(name):
        return UNKNOWN, len(shape)
    return name.rsplit(".", 1)[-1], len(shape)


def shape_role(shape: Shape) -> str:
    """What a tensor's shape alone says it is (how the report describes a pair matched by order and shape)."""
    return {
        0: "scalar",
        1: "vector (bias, norm scale/shift or statistics)",
        2: "matrix (linear or embedding weight)",
        3: "conv1d kernel",
        4: "conv2d kernel",
        5: "conv3d kernel",
    }.get(len(shape), f"{len(shape)}-d tensor")


def _shapes(tensors: Mapping[str, torch.Tensor | Sequence[int]]) -> dict[str, Shape]:
    return {
        k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v)
        for k, v in tensors.items()
        if not k.endswith("num_batches_tracked")
    }  # a step counter, not knowledge


# ----------------------------------------------------------------------------------------------------------------
# Needleman-Wunsch with a gap score of 0: maximise the summed pair scores. Pairs that may not be aligned are None.


def _forward(score: list[list[int | None]], n: int, m: int) -> list[list[int]]:
    f = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, prev, s_row = f[i], f[i - 1], score[i - 1]
        for j in range(1, m + 1):
            best = prev[j] if prev[j] > row[j - 1] else row[j - 1]
            s = s_row[j - 1]
            if s is not None and prev[j - 1] + s > best:
                best = prev[j - 1] + s
            row[j] = best
    return f


def _backward(score: list[list[int | None]], n: int, m: int) -> list[list[int]]:
    b = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        row, nxt, s_row = b[i], b[i + 1], score[i]
        for j in range(m - 1, -1, -1):
            best = nxt[j] if nxt[j] > row[j + 1] else row[j + 1]
            s = s_row[j]
            if s is not None and nxt[j + 1] + s > best:
                best = nxt[j + 1] + s
            row[j] = best
    return b


def align(score: list[list[int | None]]) -> tuple[int, list[tuple[int, int]], dict[int, list[int | None]]]:
    """Best global alignment of sources (rows) and targets (columns) under ``score``.

    Args:
        score: ``score[i][j]`` for pairing source i with target j, None where they may not pair.

    Returns:
        (best score, chosen pairs (i, j), ambiguous targets: j -> every choice some optimal alignment makes for
        it, a source index or None for "unmatched").
    """
    n = len(score)
    m = len(score[0]) if n else 0
    if not n or not m:
        return 0, [], {}
    f, b = _forward(score, n, m), _backward(score, n, m)
    best = f[n][m]
    # choices per target j: source i if some optimal path uses (i, j); None if some optimal path skips j.
    # Vectorised over the whole table (integer scores: == is exact): this check visits every cell, like the DP.
    fa, ba = np.array(f, dtype=np.int64), np.array(b, dtype=np.int64)
    sa = np.array([[-1 if s is None else s for s in row] for row in score], dtype=np.int64)
    uses = (sa >= 0) & (fa[:n, :m] + sa + ba[1:, 1:] == best)  # uses[i, j]: pair (i, j) on an optimal path
    skips = (fa[:, :m] + ba[:, 1:] == best).any(axis=0)  # skips[j]: an optimal path leaves target j unmatched
    ambiguous: dict[int, list[int | None]] = {}
    for j in np.flatnonzero(uses.sum(axis=0) + skips > 1).tolist():
        options: list[int | None] = np.flatnonzero(uses[:, j]).tolist()
        if skips[j]:
            options.append(None)
        ambiguous[j] = options
    # traceback from the end, preferring to leave the *last* target unmatched: sources go to the earliest targets
    pairs, i, j = [], n, m
    while i > 0 and j > 0:
        s = score[i - 1][j - 1]
        if f[i][j - 1] == f[i][j]:
            j -= 1
        elif s is not None and f[i - 1][j - 1] + s == f[i][j]:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        else:
            i -= 1
    return best, pairs[::-1], ambiguous


def _tensor_scores(
    src: list[tuple[str, Shape]], tgt: list[tuple[str, Shape]], adaptable: Adaptable | None
) -> list[list[int | None]]:
    by_role: dict[tuple[str, int], list[int]] = {}  # only same-role pairs can score: visit those alone
    by_rank: dict[int, list[int]] = {}
    for j, (tn, ts) in enumerate(tgt):
        by_role.setdefault(role(tn, ts), []).append(j)
        by_rank.setdefault(len(ts), []).append(j)
    unknown = {j for j, (tn, ts) in enumerate(tgt) if role(tn, ts)[0] == UNKNOWN}
    out = []
    for sn, ss in src:
        row: list[int | None] = [None] * len(tgt)
        r = role(sn, ss)
        for j in by_role.get(r, ()) if r[0] != UNKNOWN else ():
            tn, ts = tgt[j]
            if ss == ts:
                row[j] = EXACT
            elif adaptable is not None and adaptable(sn, ss, tn, ts):
                row[j] = ADAPTED
        # a name without a role pairs by shape alone (the same shape, never adapted: nothing says it is the same
        # kind of tensor), with any tensor of its rank; the alignment keeps the order
        for j in by_rank.get(len(ss), ()) if r[0] == UNKNOWN else sorted(unknown & set(by_rank.get(len(ss), ()))):
            if ss == tgt[j][1]:
                row[j] = EXACT
        out.append(row)
    return out


ROLE_RANK = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3}


def canonical_order(names: Sequence[str]) -> list[str]:
    """Modules in their order of first appearance; inside a module: weight, bias, running_mean, running_var, rest.

    Implementations list a layer's tensors in different orders (a BatchNorm's bias before its weight, say); the
    alignment cannot cross pairs, so each side is put into this one order first.
    """
    modules: dict[str, list[str]] = {}
    for n in names:
        modules.setdefault(n.rsplit(".", 1)[0] if "." in n else "", []).append(n)
    out = []
    for members in modules.values():
        out += sorted(members, key=lambda n: ROLE_RANK.get(n.rsplit(".", 1)[-1], len(ROLE_RANK)))
    return out


def natural_key(name: str) -> list[Any]:
    """Sort key reading digit runs as numbers: ``blocks.2`` before ``blocks.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _groups(names: list[str], groups: Mapping[str, str] | None) -> list[tuple[str, list[str]]] | None:
    """Ordered (group, members) for ``names``; consecutive names of one group form one run."""
    if not groups:
        return None
    out: list[tuple[str, list[str]]] = []
    for n in names:
        g = groups.get(n, "(ungrouped)")
        if out and out[-1][0] == g:
            out[-1][1].append(n)
        else:
            out.append((g, [n]))
    return out


def _align_structure(
    src: dict[str, Shape],
    tgt: dict[str, Shape],
    src_groups: Mapping[str, str] | None,
    tgt_groups: Mapping[str, str] | None,
    adaptable: Adaptable | None,
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """{target: source} from the structural alignment, and the ambiguities met."""
    src = {n: src[n] for n in canonical_order(list(src))}
    tgt = {n: tgt[n] for n in canonical_order(list(tgt))}
    sg, tg = _groups(list(src), src_groups), _groups(list(tgt), tgt_groups)
    if sg is None or tg is None:
        sg, tg = [("all", list(src))], [("all", list(tgt))]
    # group level: the score of pairing two groups is the best alignment of their tensors
    inner: dict[tuple[int, int], tuple[int, list[tuple[int, int]], dict[int, list[int | None]]]] = {}
    gscore: list[list[int | None]] = []
    for a, (_, s_names) in enumerate(sg):
        row: list[int | None] = []
        for c, (_, t_names) in enumerate(tg):
            res = align(_tensor_scores([(n, src[n]) for n in s_names], [(n, tgt[n]) for n in t_names], adaptable))
            inner[a, c] = res
            row.append(res[0] if res[0] > 0 else None)
        gscore.append(row)
    _, gpairs, gamb = align(gscore) if len(sg) > 1 or len(tg) > 1 else (0, [(0, 0)], {})
    ambiguities = []
    chosen_g = {c: a for a, c in gpairs}
    for c, options in gamb.items():
        ambiguities.append(
            {
                "level": "group",
                "target": tg[c][0],
                "chosen": sg[chosen_g[c]][0] if c in chosen_g else None,
                "candidates": [None if o is None else sg[o][0] for o in options],
            }
        )
    out: dict[str, str] = {}
    for a, c in gpairs:
        _, pairs, amb = inner[a, c]
        s_names, t_names = sg[a][1], tg[c][1]
        chosen = {j: i for i, j in pairs}
        for i, j in pairs:
            out[t_names[j]] = s_names[i]
        for j, options in amb.items():
            ambiguities.append(
                {
                    "level": "tensor",
                    "target": t_names[j],
                    "chosen": s_names[chosen[j]] if j in chosen else None,
                    "candidates": [None if o is None else s_names[o] for o in options],
                }
            )
    return out, ambiguities


def closest_pairs(source: Mapping[str, Shape], target: Mapping[str, Shape], k: int = 5) -> list[str]:
    """The k most alike (target, source) pairs by name and shape, to show when nothing matched."""
    scored = []
    for tn, ts in target.items():
        for sn, ss in source.items():
            name_sim = difflib.SequenceMatcher(None, normalize(tn), normalize(sn)).ratio()
            shape_sim = 1.0 if ss == ts else 0.5 if len(ss) == len(ts) else 0.0
            scored.append((name_sim + shape_sim, tn, ts, sn, ss))
    scored.sort(key=lambda r: -r[0])
    return [f"target '{tn}' {ts} ~ source '{sn}' {ss}" for _, tn, ts, sn, ss in scored[:k]]


def match_state_dicts(
    source: Mapping[str, torch.Tensor | Sequence[int]],
    target: Mapping[str, torch.Tensor | Sequence[int]],
    *,
    rules: Sequence[Mapping[str, str]] | None = None,
    methods: Sequence[str] = METHODS,
    source_groups: Mapping[str, str] | None = None,
    target_groups: Mapping[str, str] | None = None,
    adaptable: Adaptable | None = None,
    strict: bool = False,
    prefixes: Sequence[str] = PREFIXES,
) -> MatchResult:
    """Pair target tensors with source tensors: names, then rules, then structure (see the module docstring).

    Args:
        source: source state_dict (tensors or shapes).
        target: target state_dict (tensors or shapes).
        rules: regex renames for the ``rules`` pass.
        methods: the passes to run, any of ``names``, ``rules``, ``structure``.
        source_groups: source tensor name -> layer-group name (blocks), if the source exposes groups.
        target_groups: the same for the target; groups are used only when both are given.
        adaptable: ``(source name, source shape, target name, target shape) -> bool`` for pairs of the same role
            but different shapes that surgery can adapt (the structure pass pairs only those, or equal shapes).
        strict: raise ``TransferError`` on an ambiguous alignment instead of choosing and reporting.
        prefixes: wrapper prefixes stripped by ``names``.

    Raises:
        RecipeError: an unknown method, a bad rule or a rule that matches nothing.
        TransferError: nothing matched at all (with the closest pairs), or an ambiguity under ``strict``.
    """
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise RecipeError(f"unknown matching method(s) {bad}; valid: {', '.join(METHODS)}")
    src, tgt = _shapes(source), _shapes(target)
    result = MatchResult(methods=tuple(m for m in METHODS if m in methods))
    taken: set[str] = set()

    def by_name(renamed: Mapping[str, str], method: str) -> None:
        s_index = _index([n for n in src if n not in taken], lambda n: renamed[n])
        t_index = _index([n for n in tgt if n not in result.pairs], lambda n: normalize(n, prefixes))
        for key, t in t_index.items():
            s = s_index.get(key)
            if s is not None:
                result.pairs[t] = (s, method)
                taken.add(s)

    if "names" in methods:
        by_name({n: normalize(n, prefixes) for n in src}, "names")
    if "rules" in methods and rules:
        # the rules see every source name (a rule naming an already-matched tensor still counts as matching)
        renamed = apply_rules([normalize(n, prefixes) for n in src], rules)
        by_name({n: renamed[normalize(n, prefixes)] for n in src}, "rules")
    if "structure" in methods:
        s_left = {n: s for n, s in src.items() if n not in taken}
        t_left = {n: s for n, s in tgt.items() if n not in result.pairs}
        if s_left and t_left:
            pairs, ambiguities = _align_structure(s_left, t_left, source_groups, target_groups, adaptable)
            for t, s in pairs.items():  # a pair a name could not vouch for was matched by order and shape
                result.pairs[t] = (s, "order" if uninformative(s) or uninformative(t) else "structure")
                taken.add(s)
            result.ambiguities = ambiguities
    if not result.pairs and src and tgt:
        raise TransferError(
            f"the source ({len(src)} tensors) and the target ({len(tgt)} tensors) have nothing in common by "
            f"{', '.join(result.methods)}. Closest pairs found:\n  "
            + "\n  ".join(closest_pairs(src, tgt))
            + "\nAdd rename rules ({from: REGEX, to: REPLACEMENT}) or check that these are the models you meant."
        )
    if strict and result.ambiguities:
        lines = [
            f"{a['level']} '{a['target']}': candidates {a['candidates']} (chose {a['chosen']})"
            for a in result.ambiguities[:10]
        ]
        raise TransferError(
            f"{len(result.ambiguities)} ambiguous pairing(s) under strict matching (None = leave "
            "fresh):\n  " + "\n  ".join(lines) + "\nAdd rename rules to decide, or strict=false to "
            "accept the reported choice."
        )
    result.unused_source = [n for n in src if n not in taken]
    return result
