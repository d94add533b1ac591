"""Every recipe key is read somewhere (issue 18, defect 2): a field the schema accepts but no code reads is a key
that is silently ignored.

The test walks the recipe's pydantic models (``transferkit.config``) and looks for each field name in the source
outside ``config/``: as an attribute (``.image_size``) or as a key (``"image_size"``, ``'image_size'``). A field read
only under another name must be in ``READ_ELSEWHERE`` with the place that reads it.

A name found is not proof that the value is honoured (``source.weights`` was passed to every builder, and the
``hf:`` vision one dropped it): the tests of each key do that; this one catches a field nothing reads at all.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel

import transferkit
from transferkit.config import Recipe

SRC = Path(transferkit.__file__).resolve().parent

# Fields read under another name ("MODEL.FIELD": where it is read). Empty: the grep finds every field today. Keep it
# short, and add only a field that really is read (the last test fails for an entry the grep finds anyway).
READ_ELSEWHERE: dict[str, str] = {}


def _models(model: type[BaseModel], seen: dict[str, type[BaseModel]]) -> dict[str, type[BaseModel]]:
    """The model and every pydantic model its fields hold (in unions, lists, dicts), by qualified name."""
    if model.__qualname__ in seen:
        return seen
    seen[model.__qualname__] = model

    def inner(ann: Any) -> list[Any]:
        return [ann, *(t for a in get_args(ann) for t in inner(a))]

    for field in model.model_fields.values():
        for t in inner(field.annotation):
            if isinstance(t, type) and issubclass(t, BaseModel):
                _models(t, seen)
    return seen


def _source_text() -> str:
    config = SRC / "config"
    return "\n".join(p.read_text() for p in sorted(SRC.rglob("*.py")) if config not in p.parents)


def _unread(root: type[BaseModel], text: str) -> list[str]:
    """``MODEL.FIELD`` of every field under ``root`` that ``text`` never reads (allow-list aside)."""
    unread = []
    for qualname, model in _models(root, {}).items():
        for name in model.model_fields:
            key = f"{qualname}.{name}"
            if key not in READ_ELSEWHERE and not re.search(rf"\.{name}\b|[\"']{name}[\"']", text):
                unread.append(key)
    return unread


def test_every_recipe_field_is_read_outside_the_schema() -> None:
    assert _unread(Recipe, _source_text()) == [], "recipe fields that no code outside transferkit/config reads"


def test_a_field_nobody_reads_is_reported() -> None:
    class Inner(BaseModel):
        image_size: int = 0
        never_read_anywhere: bool = False

    class Root(BaseModel):
        data: list[Inner] | None = None

    unread = _unread(Root, _source_text())
    assert [key.rsplit(".<locals>.", 1)[-1] for key in unread] == ["Inner.never_read_anywhere"]


def test_the_allow_list_names_real_fields_that_the_grep_misses() -> None:
    fields = {f"{q}.{n}" for q, m in _models(Recipe, {}).items() for n in m.model_fields}
    assert set(READ_ELSEWHERE) <= fields
    text = _source_text()
    for key in READ_ELSEWHERE:
        name = key.rsplit(".", 1)[1]
        assert not re.search(rf"\.{name}\b|[\"']{name}[\"']", text), f"{key} is found by the grep: drop it"
