"""Ratchet tests for the project's layering rules (../shared/DESIGN.md)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN_IN_CORE = {"ray", "pydantic", "fastapi"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_imports_no_ray_pydantic_fastapi():
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imports(p) & FORBIDDEN_IN_CORE)
        for p in (ROOT / "nanochat").rglob("*.py")
        if _imports(p) & FORBIDDEN_IN_CORE
    }
    assert not offenders, f"nanochat/ must stay free of ray/pydantic/fastapi: {offenders}"


def test_jobs_do_not_import_each_other():
    # entrypoints are the modules run as `python -m jobs.<name>`; shared modules (config, registry,
    # chat_stage: the two chat stages' common CLI) may be imported by them. One exception: the
    # pipeline's --plan reads stage settings (a stage's config class is the only home of its knobs
    # and defaults), so the pipeline may import `...Config` classes, and nothing else, from a stage.
    stage_modules = {p.stem for p in (ROOT / "jobs").glob("*.py") if 'if __name__ == "__main__"' in p.read_text()}
    offenders: dict[str, list[str]] = {}
    for p in (ROOT / "jobs").glob("*.py"):
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jobs"):
                mods = {node.module.split(".")[1]} if "." in node.module else {a.name for a in node.names}
                bad = (mods & stage_modules) - {p.stem}
                if bad and p.stem == "pipeline" and all(a.name.endswith("Config") for a in node.names):
                    continue
                if bad:
                    offenders.setdefault(p.name, []).extend(sorted(bad))
    assert not offenders, f"jobs/ entrypoints must not import each other: {offenders}"


def test_every_python_file_has_a_docstring():
    missing = []
    for folder in ("nanochat", "cluster", "jobs", "serve_app", "benchmarks"):
        for p in (ROOT / folder).rglob("*.py"):
            if p.name == "__init__.py" and not p.read_text().strip():
                continue
            if ast.get_docstring(ast.parse(p.read_text())) is None:
                missing.append(str(p.relative_to(ROOT)))
    assert not missing, f"files without a module docstring: {missing}"
