"""The layering rules of docs/architecture.md that import-linter's contracts do not express on their own."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import transferkit

SRC = Path(transferkit.__file__).parent


def test_configs_and_stage_registry_import_no_torch() -> None:
    """Reading and validating a recipe's schema, and listing the stages, needs neither torch nor the runtime."""
    code = (
        "import sys, transferkit.config, transferkit.stages\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'transformers', 'accelerate') if m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _cycles() -> list[list[str]]:
    """Strongly connected components (more than one module) of the import graph of transferkit."""
    import grimp

    graph = grimp.build_graph("transferkit")
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_import_cycles_are_only_registration_inside_one_package() -> None:
    """A cycle may only join a registry module with the modules that register into it, inside one package (the
    package imports its members, which import the registry back); nothing else imports in a circle."""
    for cycle in _cycles():
        packages = {m.rsplit(".", 1)[0] for m in cycle}
        registry = min(cycle, key=len)
        assert len(packages) <= 2 and all(m.startswith(registry.rsplit(".", 1)[0]) for m in cycle), cycle
        assert registry in ("transferkit.sources", "transferkit.strategies", "transferkit.models.base"), cycle


def test_no_modality_dispatch_outside_the_modality_modules() -> None:
    """Each modality's behaviour lives in its module (data/images, data/text, data/audio) behind the registry of
    data/modality: no code elsewhere compares a modality with a modality's name."""
    pattern = re.compile(
        r"modality\s*(==|!=)\s*[\"']"  # modality == "text"
        r"|[\"']\s*(==|!=)\s*[\w.]*modality\b"  # "text" == data.modality
        r"|modality\s+(not\s+)?in\s*[(\[{]\s*[\"']"  # modality in ("text", ...)
    )
    modality_modules = {SRC / "data" / n for n in ("modality.py", "images.py", "text.py", "audio.py")}
    offenders = [
        f"{path.relative_to(SRC)}:{i}: {line.strip()}"
        for path in sorted(SRC.rglob("*.py"))
        if path not in modality_modules
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
