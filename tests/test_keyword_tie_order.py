"""The keyword limit cuts a run of matches equal in bm25 in name order (keywords.TIE_ORDER) so that the one kept is
the one the engine lists first (settle_ties: each row's shown path, catalog.FileRow.path). Ordered by root, then
relpath, the cut disagreed with that name where a folder's name is another's plus a space ("p" and "p q": "p q/x"
sorts before "p/x") and for lists, whose rows are shown by their entry alone, not the list's name."""

import pytest

from alignsearch.media import sources
from alignsearch.storage import catalog, keywords


@pytest.mark.parametrize("rows", [
    [("/r/p", "kite.jpg"), ("/r/p q", "kite.jpg")],  # a folder named as another plus a space
    [("/l/a.csv", "/x/z/kite.jpg"), ("/l/b.csv", "/x/a/kite.jpg")],  # lists: shown by the entry alone
])
def test_the_keyword_limit_keeps_the_match_first_by_the_path_the_engine_lists_ties_by(tmp_path, rows):
    db = catalog.connect(tmp_path / "catalog.db")
    with db.begin() as conn:
        ids = {}
        for root, relpath in rows:
            fid = catalog.upsert_file(conn, {"root": root, "relpath": relpath, "size": 1, "mtime": 0.0,
                                             "status": catalog.INDEXED})
            catalog.set_photo(conn, fid, relpath, {"caption": None})
            ids[fid] = sources.location(root, relpath)
    with db.connect() as conn:
        ranked = keywords.search(conn, keywords.parse("kite"), 2)
        assert len({s for _, s in ranked}) == 1, ranked  # one bm25: a tie the name settles
        kept = keywords.search(conn, keywords.parse("kite"), 1)
    db.dispose()
    assert [ids[i] for i, _ in kept] == [min(ids.values())], (kept, ids)
