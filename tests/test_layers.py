"""The README's architecture tables name every module of every wing, and only modules that exist (the table
had fallen 11 modules behind the code; issue 26)."""

import re

import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tables() -> dict[str, set[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Architecture"):text.index("## Benchmarks")]
    tables: dict[str, set[str]] = {}
    folder = None
    for line in section.splitlines():
        head = re.match(r"\| \w+ \(`([\w/]+)/`\) \|", line)
        if head:
            folder = head.group(1)
            tables[folder] = set()
        elif folder and line.startswith("|") and not line.startswith("|---"):
            first = line.split("|")[1]
            tables[folder] |= set(re.findall(r"`([\w/]+?)(?:\.py)?/?`", first))
        elif not line.startswith("|"):
            folder = None
    return tables


def _modules(folder: str) -> set[str]:
    where = ROOT / folder
    names = {p.stem for p in where.glob("*.py") if p.stem not in ("__init__", "__main__")}
    names |= {p.name for p in where.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    if folder != "alignsearch":
        return names
    return names - {"storage", "media", "encoders", "search", "surfaces"}  # the wings: tables of their own


def test_the_architecture_tables_name_every_module_and_no_other():
    tables = _tables()
    wings = {"alignsearch", "alignsearch/storage", "alignsearch/media", "alignsearch/encoders", "alignsearch/search",
             "alignsearch/surfaces", "indexer"}
    assert set(tables) == wings
    for folder, named in tables.items():
        have = _modules(folder)
        if folder == "alignsearch/surfaces":
            have.add("web")  # the page's folder (static files, no module)
        assert named == have, (folder, "missing:", sorted(have - named), "not a module:", sorted(named - have))


@pytest.mark.slow
def test_no_test_module_imports_another():
    """Tests share code through tests/helpers.py (and conftest.py's fixtures), never by importing another test
    module: test_old_schema imported dump and hashes from test_state, which ran test_state's module code (its
    fixtures, its imports) in every session collecting test_old_schema and tied the two files together."""
    import ast

    offenders = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0].startswith("test_")]
    assert offenders == []
