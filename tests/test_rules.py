"""Ratchet tests for the project's layering rules (docs/DESIGN.md)."""

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


MAX_LINES = 520  # "~500": a file past it says why in its docstring, with the words "over 500 lines"


def test_no_production_file_grows_past_500_lines_without_a_reason():
    unexplained = []
    for folder in ("nanochat", "cluster", "jobs", "serve_app", "benchmarks"):
        for p in (ROOT / folder).rglob("*.py"):
            text = p.read_text()
            if text.count("\n") > MAX_LINES and "over 500 lines" not in (ast.get_docstring(ast.parse(text)) or ""):
                unexplained.append(f"{p.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert not unexplained, f"split these files by concept, or say in the docstring why not: {unexplained}"


OUTSIDE_DESIGN = "/".join(("shared", "DESIGN"))  # spelled apart, so this file does not match itself


def test_nothing_in_the_repository_points_to_the_design_outside_it():
    hits = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
            if p.is_file() and p.suffix in {".py", ".md", ".yaml", ".toml", ".sh"} and ".git" not in p.parts
            and "target" not in p.parts and OUTSIDE_DESIGN in p.read_text(errors="ignore")]
    assert not hits, f"the design is docs/DESIGN.md; these still point outside the repository: {hits}"

