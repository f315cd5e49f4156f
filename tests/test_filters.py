"""Issue 15: the --where language and the named filter flags, evaluated over columns (no model needed)."""

import numpy as np
import pytest

from alignsearch.search import filters
from alignsearch.errors import UsageError

ROWS = {
    "taken": np.array([filters.parse_date("2019-07-14"), filters.parse_date("2020-01-01T10:00:00+02:00"), np.nan, 0.0]),
    "camera": np.array(["canon eos 5d", "nikon d750", None, "canon powershot"], dtype=object),
    "format": np.array(["jpeg", "png", "jpeg", "jpeg"], dtype=object),
    "path": np.array(["trips/lisbon/a.jpg", "trips/b.png", "home/c.jpg", "trips/lisbon/2019/d.jpg"], dtype=object),
    "lat": np.array([38.72, -33.87, np.nan, 38.70]),
    "lon": np.array([-9.14, 151.21, np.nan, -9.20]),
    "width": np.array([4000, 640, 100, 3000], dtype=float),
}
TAGS = {"cat": np.array([True, False, False, True])}


def mask(expr=None, **flags):
    node = filters.build(filters.FilterOptions(where=expr, **flags))
    return filters.evaluate(node, ROWS.__getitem__, lambda label: TAGS.get(label.lower(), np.zeros(4, bool))).tolist()


def test_comparisons_and_logic():
    assert mask("width >= 3000") == [True, False, False, True]
    assert mask("camera ~ canon and width > 3500") == [True, False, False, False]
    assert mask("camera ~ 'CANON' or format = png") == [True, True, False, True]
    assert mask("not (camera ~ canon)") == [False, True, True, False]  # unknown camera: not matched, so not() is
    assert mask('format != "png"') == [True, False, True, True]
    assert mask("tag = Cat") == [True, False, False, True]


def test_dates_are_iso_after_inclusive_before_exclusive():
    assert mask(after="2019-07-14") == [True, True, False, False]
    assert mask(before="2019-07-14") == [False, False, False, True]
    assert mask(after="2020-01-01T08:00:00Z", before="2020-01-01T08:00:01Z") == [False, True, False, False]
    assert mask("taken < 2000-01-01") == [False, False, False, True]


def test_near_is_great_circle_and_handles_the_southern_and_western_hemispheres():
    assert mask(near="38.7223,-9.1393,10") == [True, False, False, True]
    assert mask(near=(-33.86, 151.20, 5)) == [False, True, False, False]
    assert mask("near(38.7223, -9.1393, 3)") == [True, False, False, False]


def test_path_glob_star_stays_in_a_folder_double_star_crosses():
    assert mask(path="trips/*.png") == [False, True, False, False]
    assert mask(path="trips/*") == [False, True, False, False]
    assert mask(path="trips/**") == [True, True, False, True]
    assert mask(path="**/lisbon/**/*.jpg") == [True, False, False, True]
    assert mask('path glob "TRIPS/lisbon/*.jpg"') == [True, False, False, False]


@pytest.mark.parametrize("expr", [
    "", "width >", "width > abc", "colour = red", "(width > 3", "width > 3)", "camera < 3", "taken = yesterday",
    "width ~ 3", "near(1, 2)", "near(100, 0, 1)", "width > 3 and", "format glob x", "width > 3 width < 4",
    "width = nan",
])
def test_malformed_expressions_are_a_clear_usage_error(expr):
    with pytest.raises(UsageError) as exc:
        filters.parse(expr)
    assert exc.value.exit_code == 2 and str(exc.value).split(":")[0] in ("--where", "near")


def test_the_language_is_never_sql():
    """Quotes and SQL are values, never code."""
    assert mask("camera = \"x' or 1=1 --\"") == [False] * 4
    assert filters.parse("caption ~ 'drop table files'") == filters.Compare("caption", "~", "drop table files")


def test_reciprocal_rank_fusion():
    from alignsearch.search.query import fuse
    from alignsearch.storage.keywords import words

    assert fuse([1, 2, 3], [3, 4]) == [3, 1, 2, 4]  # 3 is in both lists
    assert fuse([], [7, 8]) == [7, 8]
    assert words("A dog on the beach, DOG!") == ["dog", "beach"]


def test_candidate_depth_rises_as_selectivity_falls():
    from alignsearch.storage.ann import IndexPlan, filtered_nprobe

    plan = IndexPlan("ivfpq", 4096, 64, 8)
    assert filtered_nprobe(16, plan, 100, 1_000_000, 500_000) == 16  # half the vectors: about as unfiltered
    assert filtered_nprobe(16, plan, 100, 1_000_000, 10_000) == 656
    assert filtered_nprobe(16, plan, 100, 1_000_000, 100) == 4096  # every list, never more
    assert filtered_nprobe(16, IndexPlan("flat", 0, 0, 0), 100, 1000, 10) == 16


def test_the_bitmap_selector_selects_exactly_the_allowed_ids():
    import faiss

    from alignsearch.storage.ann import id_selector

    allowed = np.array([0, 7, 8, 9, 1000, 123457])
    selector = id_selector(allowed)
    members = [i for i in range(123460) if selector.is_member(i)]
    assert members == allowed.tolist()
    index = faiss.IndexIDMap(faiss.IndexFlatIP(4))
    x = np.eye(4, dtype=np.float32)[np.arange(20) % 4] + np.arange(20)[:, None].astype(np.float32) / 100
    index.add_with_ids(x, np.arange(20) * 1000)
    _, ids = index.search(x[:1], 5, params=faiss.SearchParameters(sel=id_selector(np.array([4000, 8000, 15000]))))
    assert sorted(i for i in ids[0].tolist() if i >= 0) == [4000, 8000, 15000]


@pytest.mark.parametrize("expr", ["(" * 300 + "width > 1" + ")" * 300, "not " * 300 + "width > 1",
                                  "(not " * 200 + "width > 1" + ")" * 200])
def test_deep_nesting_is_a_usage_error_not_a_recursion_error(expr):
    """Issue 24 #19: 300 parentheses raised RecursionError (CLI exit 1, HTTP 500)."""
    from conftest import run

    with pytest.raises(UsageError, match="nest more than"):
        filters.parse(expr)
    out = run("query", "x", "--where", expr, "--index", "/nonexistent-index", code=2).output
    assert "nest more than" in out and "Traceback" not in out


def test_nesting_up_to_the_limit_still_parses():
    depth = filters.MAX_NESTING
    assert mask("(" * depth + "width >= 3000" + ")" * depth) == [True, False, False, True]
    assert mask("not " * 2 + "width >= 3000") == [True, False, False, True]


@pytest.mark.parametrize("flags", [{"camera": ""}, {"path": "  "}, {"format": ""}, {"after": ""},
                                   {"after": "2020-01-01", "before": "2019-01-01"},
                                   {"after": "2020-01-01", "before": "2020-01-01"}])
def test_empty_flags_and_an_empty_date_range_are_usage_errors(flags):
    """Issue 24 #23: `--camera ""` was no filter at all; --after later than --before matched nothing, silently."""
    with pytest.raises(UsageError) as exc:
        mask(**flags)
    assert exc.value.exit_code == 2 and ("empty" in str(exc.value) or "not before" in str(exc.value))


def test_substring_and_equality_match_either_unicode_normalisation():
    """`--where 'path ~ café'` found nothing in a folder macOS named decomposed (NFD: e + U+0301) while
    `path glob "café*"` and keyword search found it: `~`, `=` and `!=` compare text as the glob does."""
    import unicodedata

    rows = {"path": np.array(["cafe\u0301/a.jpg", "caf\u00e9/b.jpg", "cafe/c.jpg"], dtype=object),
            "caption": np.array(["cre\u0300me", "cr\u00e8me", None], dtype=object)}

    def where(expr):
        node = filters.build(filters.FilterOptions(where=expr))
        return filters.evaluate(node, rows.__getitem__, lambda label: np.zeros(3, bool)).tolist()

    for typed in ("caf\u00e9", "cafe\u0301", "CAF\u00c9"):
        assert where(f"path ~ '{typed}'") == [True, True, False], ascii(typed)
    assert where("caption = 'cr\u00e8me'") == [True, True, False]
    assert where(f"caption != '{unicodedata.normalize('NFD', 'crème')}'") == [False, False, False]


def test_a_filter_typed_with_bytes_that_are_not_utf8_matches_the_name_as_stored():
    """A name that is not UTF-8 is stored and shown as \\xNN (bad\\xff.jpg); the same bytes typed in a shell
    ($'bad\\xff*') arrive as lone surrogates and matched nothing: `--path`, `glob`, `~` and `=` alike."""
    column = np.array(["odd/bad\\xff\\xfeutf.jpg", "odd/good.jpg", None], dtype=object)

    def hits(expr=None, **flags):
        node = filters.build(filters.FilterOptions(where=expr, **flags))
        return filters.evaluate(node, {"path": column}.__getitem__, lambda label: np.zeros(3, bool)).tolist()

    typed = b"odd/bad\xff".decode("utf-8", "surrogateescape")  # what sys.argv holds for those bytes
    assert hits(path=typed + "*") == [True, False, False]
    assert hits(f"path ~ '{typed[4:]}'") == [True, False, False]
    assert hits(f"path = '{typed}\udcfeutf.jpg'") == [True, False, False]
    assert hits(path="odd/*") == [True, True, False]
    assert filters.as_stored("caf\u00e9") == "caf\u00e9"  # UTF-8 text is left as it is


def test_a_filter_holding_a_surrogate_no_byte_stands_for_matches_nothing_rather_than_failing():
    """as_stored took only os.fsdecode's surrogates (U+DC80-U+DCFF): any other lone surrogate in a filter given to
    the Python API (engine.search(path="\\ud800*")) ended the search in a UnicodeEncodeError where it matched
    nothing before. No stored name holds one (names are UTF-8 or \\xNN): it matches nothing; the escaped bytes beside
    it are still taken as \\xNN."""
    column = np.array(["odd/bad\\xff.jpg", "odd/good.jpg", None], dtype=object)

    def hits(expr=None, **flags):
        node = filters.build(filters.FilterOptions(where=expr, **flags))
        return filters.evaluate(node, {"path": column}.__getitem__, lambda label: np.zeros(3, bool)).tolist()

    assert hits(path="\ud800*") == [False, False, False]
    assert hits("path ~ 'bad\ud800'") == [False, False, False]
    assert hits("path ~ 'odd'") == [True, True, False]
    assert filters.as_stored("bad\udcff\ud800") == "bad\\xff\ud800"
