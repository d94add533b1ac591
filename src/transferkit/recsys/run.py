"""A recommendation recipe run (``recsys:``), step by step, and the predictor of its run directory.

``prepare_recsys`` reads the interactions and splits them leave-last-out (each user's last event is the test, the
one before the validation); ``train_arm`` trains one arm for one seed, ``popularity_arm`` scores the baseline,
``best_arm`` and ``write_recsys_run`` select and write the run. The ``recsys`` stages (``stages/recsys.py``) run
them, each trained arm and seed saved and resumable on its own. The arms:

- ``transfer`` (only with ``source_run``): the source run's model moves into a fresh target model by
  ``transfer_embeddings`` (users and items by id, towers by feature name), then trains on the target;
- ``target_only``: the same model from random weights;
- ``popularity``: the items with the most training interactions.

The run directory holds what every run holds: ``recipe.yaml``, ``run.json``, ``metrics.json`` (per arm, per seed
and mean ± sd), ``model/`` (the selected model: ``model.safetensors`` + ``model.json`` with ``"task":
"recommendation"``, its id maps and config, plus ``seen.json`` and ``items.json`` for predict) and ``report.html``.
"""

from __future__ import annotations

import html
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch

from transferkit import __version__
from transferkit.config.recsys import RecsysConfig
from transferkit.errors import DataError, DataNotFoundError
from transferkit.io import load_state_dict, read_json, replace_dir, save_tensors, write_json, write_text
from transferkit.recsys.data import (
    FeatureTable,
    Interactions,
    Split,
    _show,
    filter_interactions,
    leave_last_out,
    read_features,
    read_interactions,
    read_table,
)
from transferkit.recsys.metrics import evaluate_ranking, rmse
from transferkit.recsys.models import Popularity, TwoTower, build_two_tower, matrix_factorization
from transferkit.recsys.train import train_recommender
from transferkit.recsys.transfer import transfer_embeddings

TASK = "recommendation"


# ----------------------------------------------------------------------------------------------------------------
# Data


def _features(spec: Any) -> tuple[FeatureTable | None, dict[str, str]]:
    """A feature table and, when ``title_column`` is set, a title per id."""
    if spec is None:
        return None, {}
    raw = read_table(spec.path)
    columns = spec.columns
    if columns is None:
        columns = [c for c in raw.columns if c not in (spec.id_column, spec.title_column)]
    table = read_features(raw, spec.id_column, columns, spec.multi_value_sep, spec.numeric)
    titles = {}
    if spec.title_column is not None:
        if spec.title_column not in raw.columns:
            raise DataError(
                f"'{spec.path}' has no column title_column={spec.title_column!r}; its columns are {list(raw.columns)}"
            )
        titles = dict(zip(table.ids, raw[spec.title_column].astype(str)))
    return table, titles


def _movielens(cfg: RecsysConfig) -> tuple[Split, list[str], dict[str, str]]:
    from transferkit.recsys.movielens import cross_domain_split, movielens_100k_dir, read_movielens_100k

    data = read_movielens_100k()
    table = read_table(movielens_100k_dir() / "ml-100k.item")
    titles = dict(zip(table["item_id"].astype(str), table["movie_title"].astype(str)))
    ml = cfg.movielens
    if ml.domain == "all":
        data = filter_interactions(data, min_per_user=3)
        return leave_last_out(data, n_test=1, n_val=1), data.items, titles
    split = cross_domain_split(data, k=ml.k, split_year=ml.split_year)
    if ml.domain == "target":
        return split.target, split.target_items, titles
    frame = pd.concat([split.source.train.frame, split.source.test.frame], ignore_index=True)
    source = filter_interactions(Interactions(frame, data.item_features, data.user_features), min_per_user=3)
    return leave_last_out(source, n_test=1, n_val=1), split.source_items, titles


def load_interactions(cfg: RecsysConfig) -> tuple[Split, list[str], dict[str, str]]:
    """The leave-last-out split, the full item set to rank and the item titles (may be empty)."""
    if cfg.builtin:
        return _movielens(cfg)
    path = Path(cfg.interactions)
    if not path.is_file():
        raise DataNotFoundError(
            f"recsys.interactions: '{path}' does not exist (a CSV/TSV/Parquet file, or the "
            "built-in name movielens-100k)"
        )
    items, titles = _features(cfg.item_features)
    users, _ = _features(cfg.user_features)
    data = read_interactions(
        path,
        cfg.user_column,
        cfg.item_column,
        cfg.rating_column,
        cfg.timestamp_column,
        item_features=items,
        user_features=users,
    )
    data = filter_interactions(data, min_per_user=1, min_per_item=cfg.min_per_item)
    split = leave_last_out(data, n_test=1, n_val=1, by="timestamp" if data.has_timestamps else "row")
    catalogue = sorted(set(data.items) | (set(items.ids) if items is not None else set()))
    return split, catalogue, titles


# ----------------------------------------------------------------------------------------------------------------
# Models saved and loaded


def save_recsys_model(
    folder: Path, model: TwoTower, extra: dict[str, Any], seen: dict[str, list[str]], titles: dict[str, str]
) -> None:
    """Write ``model.safetensors``, ``model.json``, ``seen.json`` and ``items.json`` into ``folder``."""
    save_tensors(folder / "model.safetensors", model.state_dict())
    towers = {side: {"features": getattr(model, f"{side}_tower").feature_names} for side in ("user", "item")}
    hidden = [m.out_features for m in (model.user_tower.mlp or [])[:-1] if isinstance(m, torch.nn.Linear)]
    write_json(
        folder / "model.json",
        {
            "task": TASK,
            "modality": TASK,
            "kind": model.kind,
            "dim": model.dim,
            "hidden": hidden,
            "towers": towers,
            "user_ids": model.user_ids,
            "item_ids": model.item_ids,
            "transferkit_version": __version__,
            **extra,
        },
    )
    write_json(folder / "seen.json", seen)
    write_json(folder / "items.json", {i: titles[i] for i in model.item_ids if i in titles})


def is_recsys_folder(path: str | Path) -> bool:
    path = Path(path)
    folder = path / "model" if (path / "model" / "model.json").is_file() else path
    meta = folder / "model.json"
    try:
        return meta.is_file() and read_json(meta).get("task") == TASK
    except (ValueError, UnicodeDecodeError, AttributeError):  # a corrupt model.json: load_model names the problem
        return False


def load_recsys_model(path: str | Path) -> tuple[TwoTower, dict[str, Any], Path]:
    """The model of a recsys run directory (its ``model/``) or model folder, with its ``model.json``."""
    path = Path(path)
    folder = path / "model" if (path / "model" / "model.json").is_file() else path
    if not (folder / "model.json").is_file():
        raise DataNotFoundError(
            f"'{path}' is neither a recommendation run directory nor a model folder (no model.json)"
        )
    meta = read_json(folder / "model.json")
    if meta.get("task") != TASK:
        raise DataError(
            f"'{folder}' holds a {meta.get('task', meta.get('modality', 'classification'))} model, not "
            "a recommendation model"
        )
    state = load_state_dict(folder / "model.safetensors")

    def table(side: str, ids: list[str]) -> FeatureTable | None:
        names = meta["towers"][side]["features"]
        return FeatureTable(ids, np.zeros((len(ids), len(names)), np.float32), names) if names else None

    model = TwoTower(
        meta["user_ids"],
        meta["item_ids"],
        meta["dim"],
        table("user", meta["user_ids"]),
        table("item", meta["item_ids"]),
        meta.get("hidden", []),
        kind=meta["kind"],
    )
    model.load_state_dict(state)
    return model.eval(), meta, folder


# ----------------------------------------------------------------------------------------------------------------
# The run


def _build(cfg: RecsysConfig, split: Split, items: list[str], seed: int, dim: int | None = None) -> TwoTower:
    if cfg.model == "mf":
        return matrix_factorization(split.train, dim=dim or cfg.dim, items=items, seed=seed)
    return build_two_tower(split.train, dim=dim or cfg.dim, items=items, hidden=cfg.hidden, seed=seed)


def _evaluate(model: Any, split: Split, cfg: RecsysConfig) -> dict[str, dict[str, float]]:
    out = {
        "val": evaluate_ranking(model, split.val, [split.train], ks=cfg.ks, what="validation"),
        "test": evaluate_ranking(model, split.test, [split.train, split.val], ks=cfg.ks),
    }
    out = {k: {m: round(float(v), 4) for m, v in d.items() if m in cfg.metrics} for k, d in out.items()}
    if cfg.loss == "mse" and isinstance(model, TwoTower):
        out["val"]["rmse"] = round(rmse(model, split.val), 4)
        out["test"]["rmse"] = round(rmse(model, split.test), 4)
    return out


def _select_metric(cfg: RecsysConfig) -> tuple[str, bool]:
    """The validation metric that picks epochs and the saved model, and whether lower is better."""
    if cfg.loss == "mse":
        return "rmse", True
    return ("ndcg@10" if "ndcg@10" in cfg.metrics else cfg.metrics[0]), False


def _summary(per_seed: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    first = next(iter(per_seed.values()))["test"]
    for metric in first:
        values = [r["test"][metric] for r in per_seed.values()]
        out[metric] = {
            "mean": round(statistics.fmean(values), 4),
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        }
    return out


@dataclass
class RecsysData:
    """What every step of a recommendation run reads: the split, the items to rank, titles, the source model."""

    split: Split
    items: list[str]
    titles: dict[str, str]
    source: TwoTower | None
    source_meta: dict[str, Any] | None

    def seen(self) -> dict[str, list[str]]:
        """Every item each user has interacted with (predict leaves them out)."""
        s = self.split
        frame = pd.concat([s.train.frame, s.val.frame, s.test.frame])
        return {u: sorted(g.unique()) for u, g in frame.groupby("user")["item"]}


def prepare_recsys(cfg: RecsysConfig, log: Callable[..., Any] = print) -> RecsysData:
    """Read the interactions, split them leave-last-out, and load the source run's model when there is one."""
    split, items, titles = load_interactions(cfg)
    log(f"recsys {cfg.interactions}: {split.describe()} | {len(items)} items ranked")
    source, source_meta = None, None
    if cfg.source_run is not None:
        source, source_meta, _ = load_recsys_model(cfg.source_run)
        if cfg.model == "mf" and source.kind != "mf":
            log(f"source_run holds a {source.kind} model; its id embeddings move into the mf target")
    return RecsysData(split, items, titles, source, source_meta)


def trained_arms(cfg: RecsysConfig, data: RecsysData) -> list[str]:
    """The arms that train a model: ``transfer`` with a source run, ``target_only`` when asked for (or alone)."""
    trained = (["transfer"] if data.source is not None else []) + [a for a in cfg.baselines if a == "target_only"]
    return trained or ["target_only"]  # a run always trains a model (the one predict uses)


def train_arm(cfg: RecsysConfig, data: RecsysData, arm: str, seed: int) -> tuple[TwoTower, dict[str, Any]]:
    """Train one arm for one seed; its scores (val, test), best epoch and time, and for ``transfer`` its report."""
    split, source = data.split, data.source
    own = cfg.target_only
    model = _build(cfg, split, data.items, seed, dim=cast(TwoTower, source).dim if arm == "transfer" else own.dim)
    lr, l2, frozen = own.lr or cfg.lr, cfg.l2 if own.l2 is None else own.l2, None
    report = None
    if arm == "transfer":
        assert source is not None  # the transfer arm is trained only when there is a source
        t = cfg.transfer
        report = transfer_embeddings(source, model, users=t.users, items=t.items, towers=t.towers, new_ids=t.new_ids)
        lr, l2 = t.lr or cfg.lr, cfg.l2 if t.l2 is None else t.l2
        if t.freeze_users and t.users:
            frozen = sorted(set(source.user_ids) & set(model.user_ids)) or None
    select, _ = _select_metric(cfg)
    result = train_recommender(
        model,
        split.train,
        loss=cfg.loss,
        epochs=cfg.epochs,
        lr=lr,
        batch_size=cfg.batch_size,
        num_negatives=cfg.num_negatives,
        l2=l2,
        seed=seed,
        val=split.val,
        select=select,
        patience=cfg.patience,
        frozen_users=frozen,
    )
    scores = {**_evaluate(model, split, cfg), "best_epoch": result.best_epoch, "train_s": round(result.train_s, 3)}
    return model, {**scores, **({"transfer_report": report.to_dict()} if report is not None else {})}


def popularity_arm(cfg: RecsysConfig, data: RecsysData) -> dict[str, Any]:
    """The popularity baseline's scores (the same for every seed: it has no randomness)."""
    pop = _evaluate(Popularity(data.split.train, data.items), data.split, cfg)
    return {"seeds": {str(s): pop for s in cfg.seeds}}


def summarise_arms(arms: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each arm's per-seed scores with their mean ± sd over seeds."""
    return {name: {**arm, "mean_sd": _summary(arm["seeds"])} for name, arm in arms.items()}


def best_arm(cfg: RecsysConfig, arms: dict[str, dict[str, Any]], trained: list[str]) -> tuple[str, int]:
    """The trained arm and seed with the best validation value (the saved model)."""
    select, lower = _select_metric(cfg)

    def val_of(key: tuple[str, int]) -> float:
        value = arms[key[0]]["seeds"][str(key[1])]["val"][select]
        return -value if lower else value

    return max(((arm, seed) for arm in trained for seed in cfg.seeds), key=val_of)


def write_recsys_run(
    out: Path,
    recipe: Any,
    data: RecsysData,
    arms: dict[str, dict[str, Any]],
    best: tuple[str, int],
    selected: TwoTower,
    transfer_report: dict[str, Any] | None,
    total_s: float,
) -> dict[str, Any]:
    """``model/`` (the selected model), ``metrics.json`` and ``report.html`` of a recommendation run."""
    cfg: RecsysConfig = recipe.recsys
    select, _ = _select_metric(cfg)
    extra = {
        "arm": best[0],
        "seed": best[1],
        "selected_by": f"val {select}",
        "run": recipe.name,
        "config": cfg.model_dump(mode="json"),
        **({"source_run": str(cfg.source_run)} if cfg.source_run else {}),
    }
    seen = data.seen()
    replace_dir(out / "model", lambda tmp: save_recsys_model(tmp, selected, extra, seen, data.titles))
    source_info = cast("dict[str, Any]", data.source_meta)  # loaded with the source; read below only when there is one
    metrics = {
        "run": recipe.name,
        "task": TASK,
        "selected": {"arm": best[0], "seed": best[1]},
        "selected_by": f"val {select}",
        "transferkit_version": __version__,
        "data": {
            "interactions": cfg.interactions,
            "split": data.split.describe(),
            "items_ranked": len(data.items),
            "protocol": "leave-last-out per user: last event = test, the one before = validation; "
            "ranked against the full item set, seen items excluded",
        },
        "metrics": list(cfg.metrics) + (["rmse"] if cfg.loss == "mse" else []),
        "arms": arms,
        **(
            {
                "transfer_report": transfer_report,
                "source_run": str(cfg.source_run),
                "source_model": {
                    "kind": source_info.get("kind"),
                    "users": len(source_info["user_ids"]),
                    "items": len(source_info["item_ids"]),
                },
            }
            if data.source is not None
            else {}
        ),
        "timings": {"total_s": round(total_s, 3)},
    }
    write_json(out / "metrics.json", metrics)
    write_text(out / "report.html", recsys_report_html(metrics))
    return metrics


ARM_LABELS = {"transfer": "transfer (from source_run)", "target_only": "target only", "popularity": "popularity"}


def recsys_report_html(metrics: dict[str, Any]) -> str:
    """A small self-contained HTML page: the test metrics per arm (mean ± sd over seeds), the split, the transfer."""
    names = metrics["metrics"]
    esc = html.escape
    rows = []
    for arm, values in metrics["arms"].items():
        cells = "".join(
            f"<td>{values['mean_sd'][m]['mean']:.4f} ± {values['mean_sd'][m]['sd']:.4f}</td>"
            if m in values["mean_sd"]
            else "<td>-</td>"
            for m in names
        )
        rows.append(f"<tr><td>{esc(ARM_LABELS.get(arm, arm))}</td>{cells}</tr>")
    seeds = len(next(iter(metrics["arms"].values()))["seeds"])
    split = metrics["data"]["split"]
    split_rows = "".join(
        f"<tr><td>{k}</td><td>{v['interactions']}</td><td>{v['users']}</td><td>{v['items']}</td></tr>"
        for k, v in split.items()
    )
    transfer = ""
    if "transfer_report" in metrics:
        r = metrics["transfer_report"]
        transfer = (
            f"<h2>Transfer from {esc(metrics['source_run'])}</h2><p>users matched by id: "
            f"{r['users']['matched']}/{r['users']['target']}; items matched: {r['items']['matched']}/"
            f"{r['items']['target']}; tensors moved: {esc(', '.join(r['tensors']) or 'none')}</p>"
        )
    sel = metrics["selected"]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(metrics["run"])}: recommendation</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td:first-child{{text-align:left}}</style></head>
<body><h1>{esc(metrics["run"])}: recommendation</h1>
<p>{esc(metrics["data"]["protocol"])}; {metrics["data"]["items_ranked"]} items ranked. Test metrics, mean ± sd over
{seeds} seed(s).</p>
<table><tr><th>model</th>{"".join(f"<th>{esc(m)}</th>" for m in names)}</tr>
{"".join(rows)}</table>
<p>Saved model (used by predict): {esc(str(sel["arm"]))}, seed {sel["seed"]}, chosen by {esc(metrics["selected_by"])}.
</p>
<h2>Split</h2><table><tr><th>split</th><th>interactions</th><th>users</th><th>items</th></tr>{split_rows}</table>
{transfer}
</body></html>
"""


# ----------------------------------------------------------------------------------------------------------------
# Predict


class RecsysPredictor:
    """Top-k unseen items per user from a saved recommendation model."""

    modality = TASK

    def __init__(self, model: TwoTower, seen: dict[str, list[str]], titles: dict[str, str]):
        self.model = model.eval()
        self.seen = seen
        self.titles = titles

    @torch.no_grad()
    def predict(self, users: list[Any], top_k: int = 10) -> list[dict[str, Any]]:
        """``[{"user": id, "top": [{"label": title or id, "item": id, "probability": score}, ...]}]``.

        ``probability`` is the sigmoid of the model's score (a ranking score, not a calibrated probability); items
        the user has seen (in any split) are never recommended.

        Raises:
            DataError: a user id the model does not know (named in the message).
        """
        ids = [str(u) for u in users]
        unknown = [u for u in ids if u not in self.model.users.index]
        if unknown:
            raise DataError(
                f"unknown user id(s): {_show(unknown)}; the model knows {len(self.model.users)} users "
                f"(e.g. {_show(self.model.user_ids[:3], 3)})"
            )
        if not ids:
            return []
        scores = self.model.scores(torch.as_tensor(self.model.users.encode(ids))).float()
        index = self.model.items.index
        out = []
        for row, user in zip(scores, ids):
            seen = [index[i] for i in self.seen.get(user, []) if i in index]
            if seen:
                row[seen] = float("-inf")
            k = min(top_k, len(row) - len(seen))
            values, idx = row.topk(max(k, 0))
            top = [
                {
                    "label": self.titles.get(self.model.item_ids[j], self.model.item_ids[j]),
                    "item": self.model.item_ids[j],
                    "probability": float(torch.sigmoid(v)),
                }
                for v, j in zip(values, idx.tolist())
            ]
            out.append({"user": user, "top": top})
        return out


def load_recsys_run(path: str | Path) -> RecsysPredictor:
    """The predictor of a recommendation run directory (its ``model/``) or model folder."""
    model, _, folder = load_recsys_model(path)
    seen = read_json(folder / "seen.json") if (folder / "seen.json").is_file() else {}
    titles = read_json(folder / "items.json") if (folder / "items.json").is_file() else {}
    return RecsysPredictor(model, seen, titles)
