"""The catalog flip sweep (a7af884's, extended to every page): what each command does after one bit is flipped.

A 12-photo index built with the tests' tiny model; the lowest bit of each used byte of each page of catalog.db that
holds cells (the page header, its cell pointers and its cell content; tests/helpers.catalog_pages, from SQLite's
dbstat) flipped in turn, `query "red circle" --json -k 12`, `similar` and `verify --skip-model` run in-process on
each, the file restored after. Each outcome is one kind (tests/helpers.swept_outcome): the same answer, exit 7 with
one line, fewer rows than the intact answer with exit 0 (what must never happen), other rows or values with exit 0,
exit 1 / a traceback, another exit; for verify, damage found or not. Counted by page group, for this tree and for
--base (run from a temporary worktree of it, the sweep's code from this tree), in parallel child processes.

    python benchmarks/sweep_catalog_flips.py [--every 1] [--base main] [--pages files ...] [--no-save]

--every N flips every N-th used byte (a quicker look); the counts recorded are of every byte unless it says.
--pages GROUP sweeps only that group's pages (repeatable; the groups of the results tables): every byte of a few
groups where every byte of all is too long.
Each tree builds its own index with its own code (a catalog this tree writes may be of a schema the base refuses),
so the two columns' flips are of like catalogs, not of the same bytes.

The flips that gave other rows or values with exit 0 are listed with the field they hit (helpers.flipped_field)
and what differed (helpers.result_difference). Those seen (2026-12-06, --every 7 and the files and photos pages
at every 7th byte of their own), each a real wrong answer, none harmless:
- a photos page's cell pointer (its low byte): the photo's row and a neighbour's absent to SQLite's seek, their
  dates shown as none. Exit 7 now: a hit without its photo row runs the integrity check (Engine._hits).
- a files row's vec_row (the vector address, outside the row digest: compaction moves it): the file scored with
  another vector, so another score and order. Not found by readers yet; `verify` finds it (_misplaced).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import CACHE, add_worktree, load_note, record, remove_worktree  # noqa: E402

GROUPS = (("files", ("files",)), ("files' indexes", ("sqlite_autoindex_files_1", "files_sha256")),
          ("photos", ("photos",)), ("phashes", ("phashes",)), ("meta", ("meta", "sqlite_autoindex_meta_1")),
          ("keywords (FTS5)", ("keywords_", "keywords_trigram_")), ("schema", ("sqlite_schema",)))


def group(table: str) -> str:
    """The results row of a page's table or index (pure)."""
    for name, members in GROUPS:
        if any(table == m or (m.endswith("_") and table.startswith(m)) for m in members):
            return name
    return "other"


def tables_of(groups: list[str] | None, present) -> list[str] | None:
    """The tables and indexes of the named page groups (GROUPS' names, or "other") among those present (pure);
    None (every page) when no group is named."""
    if not groups:
        return None
    unknown = set(groups) - {g for g, _ in GROUPS} - {"other"}
    if unknown:
        raise SystemExit(f"--pages: no group {sorted(unknown)}; the groups: {[g for g, _ in GROUPS] + ['other']}")
    return [t for t in present if group(t) in groups]


def child(work: Path, model: Path, every: int, out: Path, groups: list[str] | None = None) -> None:
    """Run in a child whose alignsearch is the tree under test: build the index with that tree's code (a catalog
    another tree wrote may be one this tree refuses: a schema newer than its own), sweep it, write the outcomes."""
    import helpers

    photos, index_dir = helpers.flip_sweep_index(work, model)
    db = index_dir / "catalog.db"
    names = tables_of(groups, helpers.catalog_pages(db))
    rows = helpers.flip_sweep(photos, index_dir, helpers.flip_offsets(db, names, every=every))
    out.write_text(json.dumps(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description="flip each byte of catalog.db's pages, classify what commands do")
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--base", default="main")
    ap.add_argument("--no-save", action="store_true")
    # choices: a group's name is refused here, before the model, the base's worktree and both index builds (it was
    # refused only in the sweep's children, minutes on, as "the sweep of ... failed (exit 1)")
    ap.add_argument("--pages", action="append", choices=[g for g, _ in GROUPS] + ["other"], metavar="GROUP",
                    help="sweep only this page group (repeatable): " + ", ".join(g for g, _ in GROUPS) + ", other")
    ap.add_argument("--keep", type=Path, help="write each flip's outcomes ({tree: [...]}) to this JSON file")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent / "tests"))
    if args.child:
        return child(Path(args.child[0]), Path(args.child[1]), args.every, Path(args.child[2]), args.pages)
    load_at_start = time.time(), os.getloadavg()[0]
    from tiny_align import build_tiny_align

    import helpers

    model = CACHE / "tiny-align"
    if not (model / "config.json").exists():
        build_tiny_align(model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = add_worktree(args.base, tmp / "base-tree")
        trees = {f"base {base}": tmp / "base-tree", "this tree": HERE.parent}
        children = {}
        try:
            for name, tree in trees.items():
                work = tmp / f"work-{len(children)}"
                # the exported ONNX towers of each child go to its own folder, taken away with tmp
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(HERE.parent / "tests")]),
                       "ALIGNSEARCH_CACHE": str(work / "cache")}
                out = tmp / f"out-{len(children)}.json"
                pages = [a for g in args.pages or [] for a in ("--pages", g)]
                children[name] = (out, subprocess.Popen([sys.executable, __file__, "--every", str(args.every), *pages,
                                                         "--child", str(work), str(model), str(out)], env=env, cwd=tree))
            for name, (_, proc) in children.items():
                if proc.wait():
                    raise SystemExit(f"the sweep of {name} failed (exit {proc.returncode})")
            results = {name: json.loads(out.read_text()) for name, (out, _) in children.items()}
            if args.keep:
                args.keep.write_text(json.dumps(results))
        finally:
            remove_worktree(tmp / "base-tree")
    lines = [f"- a 12-photo index of the tiny test model; the lowest bit of {'each' if args.every == 1 else f'every {args.every}-th'} "
             f"used byte of each catalog.db page holding cells{' of ' + ', '.join(args.pages) if args.pages else ''} flipped in turn ({len(next(iter(results.values())))} flips), "
             "then `query \"red circle\" --json -k 12`, `similar img001.jpg --json -k 12`, `verify --skip-model`; "
             f"wall time {time.time() - load_at_start[0]:.0f} s", load_note(load_at_start[1]), ""]
    kinds = sorted({kind for rows in results.values() for row in rows for c in ("query", "similar") for kind in [row[c][0]]})
    for command in ("query", "similar"):
        lines += [f"`{command}`:", "", "| tree | pages | flips | " + " | ".join(kinds) + " |",
                  "|---|---|---|" + "---|" * len(kinds)]
        for name, rows in results.items():
            for grp in [g for g, _ in GROUPS] + ["other", "all"]:
                mine = [r for r in rows if grp == "all" or group(r["table"]) == grp]
                if mine:
                    count = collections.Counter(r[command][0] for r in mine)
                    lines.append(f"| {name} | {grp} | {len(mine)} | " + " | ".join(str(count[k]) for k in kinds) + " |")
        lines.append("")
    for name, rows in results.items():
        refused = [r for r in rows if "exit 7" in r["query"][0] or "exit 7" in r["similar"][0]]
        silent = sum(r["verify"][0] == "verify: ok" for r in refused)
        lines.append(f"- {name}: of {len(refused)} flips a reader refused, verify called {silent} ok")
    for name, rows in results.items():
        wrong = [r for r in rows if helpers.WRONG in (r["query"][0], r["similar"][0])]
        lines += ["", f"{name}: the flips that gave other rows or values with exit 0 ({len(wrong)}):"]
        lines += [f"- {r['table']} byte {r['at']} ({r.get('field', '?')}): "
                  + "; ".join(f"`{c}` {r[c][2] or '(same)'}" if r[c][0] == helpers.WRONG else f"`{c}` {r[c][0]}"
                              for c in ("query", "similar")) for r in wrong]
    record("The catalog flip sweep (benchmarks/sweep_catalog_flips.py)", lines, save=not args.no_save)


if __name__ == "__main__":
    main()
