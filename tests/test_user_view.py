"""The view a child run as another local user gets (helpers.exposing_mounts, can_enter): which folders closed to the
user a tmpfs covers and which paths are bound into it, so that a checkout, its Python and the tests' shared folders
are reached at their own paths wherever they lie; and CI's demand that the tests of other users run
(ALIGNSEARCH_REQUIRE_USERS). The views at work: test_nonroot_users.py."""

import pytest
import helpers
from helpers import REQUIRE_USERS, can_enter, cannot_run_as_users, exposing_mounts, users_required


def test_a_folder_is_entered_by_the_bits_of_owner_group_or_others():
    assert can_enter(0o700, 0, 0, 0, {0})
    assert not can_enter(0o700, 0, 0, 1001, {1001})
    assert can_enter(0o711, 0, 0, 1001, {1001})
    assert can_enter(0o710, 0, 5, 1001, {1001, 5})
    assert not can_enter(0o701, 0, 5, 1001, {1001, 5})  # a member of its group: the group's bits alone
    assert not can_enter(0o071, 1001, 5, 1001, {1001, 5})  # its owner: the owner's bits alone


def _mounts(paths, closed):
    return exposing_mounts(paths, closed.__contains__)


def test_nothing_is_mounted_where_every_folder_can_be_entered():
    assert _mounts(["/work/c", "/work/venv/lib/python3.11/site-packages"], set()) == []


def test_a_closed_folder_is_covered_and_each_path_in_it_bound():
    """A clone with its virtual environment in a 0700 mktemp folder, made from a Python in root's 0700 home."""
    assert _mounts(["/tmp/tmp.x/c/.venv/lib/python3.11/site-packages", "/tmp/tmp.x/c", "/usr/lib/python3.11",
                    "/root/.pyenv/versions/3.11.7", "/tmp/tmp.x/d"], {"/tmp/tmp.x", "/root"}) == [
        ("tmpfs", "/tmp/tmp.x"), ("bind", "/tmp/tmp.x/c"), ("bind", "/tmp/tmp.x/d"),
        ("tmpfs", "/root"), ("bind", "/root/.pyenv/versions/3.11.7")]


def test_closed_folders_below_the_covered_one_are_the_views_own():
    """/a/b lies in the tmpfs over /a, made 0755: only /a is covered."""
    assert _mounts(["/a/b/c"], {"/a", "/a/b"}) == [("tmpfs", "/a"), ("bind", "/a/b/c")]


def test_a_closed_folder_inside_a_bound_path_is_covered_in_turn():
    """A shared folder under a 0700 one inside the checkout: the bound checkout is the real one again."""
    assert _mounts(["/a/c/p/q", "/a/c", "/a/c/r"], {"/a", "/a/c/p"}) == [
        ("tmpfs", "/a"), ("bind", "/a/c"), ("tmpfs", "/a/c/p"), ("bind", "/a/c/p/q")]


def test_a_closed_folder_that_is_itself_needed_is_spread():
    """The clone made in the 0700 mktemp folder itself (CI's may be): its entries are shown in a tmpfs over it, and a
    path below it is the real tree's again (nothing more mounted for it unless closed in turn)."""
    assert _mounts(["/tmp/tmp.x", "/tmp/tmp.x/.venv/lib/python3.11/site-packages", "/tmp/tmp.x/tests"],
                   {"/tmp/tmp.x"}) == [("spread", "/tmp/tmp.x")]
    assert _mounts(["/a/c", "/a/c/p/q"], {"/a", "/a/c", "/a/c/p"}) == [
        ("tmpfs", "/a"), ("spread", "/a/c"), ("tmpfs", "/a/c/p"), ("bind", "/a/c/p/q")]


def test_tests_of_other_users_that_cannot_run_skip_unless_ci_requires_them(monkeypatch):
    monkeypatch.delenv(REQUIRE_USERS, raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs runuser"):
        cannot_run_as_users("needs runuser")
    monkeypatch.setenv(REQUIRE_USERS, "1")
    monkeypatch.setattr(helpers, "why_no_views", lambda: None)
    monkeypatch.setattr(helpers.os, "geteuid", lambda: 0)
    with pytest.raises(pytest.fail.Exception, match="needs runuser"):
        cannot_run_as_users("needs runuser")


def test_required_tests_of_other_users_skip_where_the_machine_lacks_what_they_need():
    assert users_required(True, True, None)
    assert not users_required(False, True, None)
    assert not users_required(True, False, None)  # not root: cannot make users
    assert not users_required(True, True, "needs unshare")  # a container without mount namespaces
