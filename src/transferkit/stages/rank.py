"""``rank:``: score the candidate sources on the target's labelled examples; the best one becomes the run's source.

Outputs: ``rank.json`` (every candidate's scores, times and status). Resume rule: a ``rank.json`` on disk is the
ranking (read back, not ranked again).
"""

from __future__ import annotations

from typing import Any

from transferkit.config import Recipe, SourceSpec
from transferkit.errors import did_you_mean
from transferkit.specs import spec_name
from transferkit.stages.base import RunContext, Stage


def done(ctx: RunContext) -> bool:
    return (ctx.out / "rank.json").is_file()


def _use(ctx: RunContext, rows: list[dict[str, Any]]) -> None:
    """Take the winner: its spec and, when the ranking saw the whole training split, its training features."""
    from transferkit.errors import SourceError

    rank = ctx.recipe.rank
    assert rank is not None
    if rows[0]["status"] != "ok":
        reasons = "; ".join(str(r.get("error")) for r in rows)
        raise SourceError(f"no candidate source could be ranked: {reasons}")
    for r in rows:
        value = r["scores"].get(rank.score)
        ctx.log(
            f"rank {r['rank']}: {r['candidate']}  {rank.score}={value if value is None else round(value, 4)}  "
            f"{r['status']}"
        )
    spec = rows[0]["spec"]
    ctx.source_spec = SourceSpec(**spec) if isinstance(spec, dict) else SourceSpec(name=spec)
    whole_split = rank.max_examples is None and rows[0].get("features") is not None
    ctx.known_features = rows[0]["features"] if whole_split else None


def load(ctx: RunContext) -> None:
    from transferkit.io import read_json

    _use(ctx, read_json(ctx.out / "rank.json")["rows"])


def run(ctx: RunContext) -> None:
    """Rank the candidates (one forward pass each). Every process ranks (deterministic); only the main one writes."""
    from transferkit.io import write_json
    from transferkit.rank import rank_candidates

    rank, data = ctx.recipe.rank, ctx.recipe.data
    assert rank is not None and data is not None
    rows = rank_candidates(
        data,
        [c.model_dump() for c in rank.candidates],
        rank.max_examples,
        rank.score,
        seed=ctx.recipe.seed,
        return_features=True,
    )
    if ctx.main:
        kept = [{k: v for k, v in r.items() if k not in ("features", "example_positions")} for r in rows]
        write_json(ctx.out / "rank.json", {"score": rank.score, "rows": kept})
    _use(ctx, rows)


def check(raw: dict[str, Any]) -> list[str]:
    from pydantic import ValidationError

    from transferkit.rank.candidates import SCORES
    from transferkit.sources import check_source_spec, source_option_problems

    rank = raw.get("rank")
    if not isinstance(rank, dict):
        return []
    problems = []
    candidates = rank.get("candidates")
    for i, c in enumerate(candidates if isinstance(candidates, list) else []):
        name = spec_name(c) if isinstance(c, (str, dict)) else None
        if name:
            problems += [f"rank.candidates.{i}: {p}" for p in check_source_spec(SourceSpec(name=name))]
            try:
                spec = SourceSpec(**c) if isinstance(c, dict) else SourceSpec(name=name)
            except ValidationError:
                continue  # the schema reports it
            problems += [f"rank.candidates.{i}.{p}" for p in source_option_problems(spec)]
    score = rank.get("score")
    if isinstance(score, str) and score not in SCORES:
        problems.append(
            f"rank.score: unknown score {score!r}.{did_you_mean(score, SCORES)} Valid choices: {', '.join(SCORES)}."
        )
    return problems


def _applies(recipe: Recipe) -> bool:
    return recipe.rank is not None


STAGE = Stage(
    "rank",
    run,
    _applies,
    done,
    load,
    keys=("rank",),
    gives=("source",),
    check=check,
    help="rank candidate sources on the target's examples; the best one is the run's source",
)
