"""A listing's links judged as a user without root's powers judges them (safeopen.planted: `me` is that user, not
root), in a child that becomes the user nobody: a link through a folder another user may write is refused by the
listing's walk (safeopen.FolderWalks, which remembers a folder's judgement while its links are stat'ed) exactly as
by a fresh safeopen.stat_through, before and after the folders change, between two listings and within one."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import NOBODY, can_drop_dac

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not can_drop_dac(),
                                reason="needs root to make other users' links and to start a process as nobody")
OWNER, ATTACKER = 3000, 4242  # the user who made a folder in this user's, and one who plants links

# The child imports everything it runs first, then becomes nobody: the tests' Python may lie where only root reads
# (a virtual environment in a private folder), so nobody could not start it, but runs what is loaded.
CHILD = """
import json, os, sys
from alignsearch import safeopen
from indexer.scan import scan_folder
os.setgroups([])
os.setgid(%d)
os.setuid(%d)
assert os.geteuid() != 0 and os.getuid() != 0

def outcome(stat_it, name):
    try:
        return ["ok", stat_it(name).st_size]
    except (OSError, safeopen.Refused) as exc:
        return [type(exc).__name__, str(exc)]

def fresh(root, name):
    return outcome(lambda n: safeopen.stat_through(root, n), name)

def listing(root):
    return {f.relpath: f.error for f in scan_folder(root)}

def pause():  # the test changes the folders as root meanwhile
    print("paused", flush=True)
    sys.stdin.readline()

out = {}
exec(sys.argv[1])
print(json.dumps(out))
""" % (NOBODY, NOBODY)


def as_nobody_child(script: str, meanwhile=None) -> dict:
    """`script` run as nobody after CHILD's imports; what it put in `out`. meanwhile: run here (as root) while
    the script waits in pause()."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if meanwhile is not None:
        assert proc.stdout.readline() == "paused\n", proc.communicate(timeout=60)[1]
        meanwhile()
    stdout, stderr = proc.communicate("\n", timeout=120)
    assert proc.returncode == 0, stderr
    return json.loads(stdout)


def _replace_by_link(folder: Path, into: Path) -> None:
    """folder moved into `into`, a folder ATTACKER made where all may write, and a link to it left in its place."""
    into.mkdir()
    os.chown(into, ATTACKER, ATTACKER)
    into.chmod(0o777)
    folder.rename(into / folder.name)
    folder.symlink_to(into / folder.name)


def _link(link: Path, target, uid: int) -> None:
    link.symlink_to(target)
    os.lchown(link, uid, uid)


@pytest.fixture
def tree():
    """base (root's, 0755): real/{0,1,2}.jpg; home (nobody's own folder, 0755) holding lib (a folder OWNER made
    there) and mine (nobody's); shared (OWNER's, writable by all). Each of lib, mine, shared holds links by OWNER,
    ATTACKER, nobody and root to real's files. A base of its own: pytest's folders are root's alone (0700)."""
    base = Path(tempfile.mkdtemp(prefix="alignsearch-nonroot-"))
    base.chmod(0o755)
    real = base / "real"
    real.mkdir()
    for i in range(3):
        (real / f"{i}.jpg").write_bytes(b"x" * (i + 1))
    home = base / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    for folder, owner, mode in ((home / "lib", OWNER, 0o755), (home / "mine", NOBODY, 0o755),
                                (base / "shared", OWNER, 0o777)):
        folder.mkdir()
        for uid, name in ((OWNER, "owner"), (ATTACKER, "attacker"), (NOBODY, "mine"), (0, "root")):
            for i in range(2):  # two of each: one judged first, the other after a change
                _link(folder / f"{name}{i}.jpg", real / f"{i}.jpg", uid)
        os.chown(folder, owner, owner)
        folder.chmod(mode)
    yield base
    shutil.rmtree(base)


NAMES = [f"{who}{i}.jpg" for i in range(2) for who in ("owner", "attacker", "mine", "root")]


def test_a_listing_as_another_user_refuses_links_through_folders_others_may_write_as_a_fresh_walk_does(tree):
    out = as_nobody_child(f"""
for root in {[str(tree / "home" / "lib"), str(tree / "home" / "mine"), str(tree / "shared")]!r}:
    walks = safeopen.FolderWalks(root)
    out[root] = [[outcome(walks.stat_through, n), fresh(root, n)] for n in {NAMES!r}]
    out[root + " listed"] = listing(root)
""")
    refused = {}
    for folder in ("home/lib", "home/mine", "shared"):
        root = str(tree / folder)
        for name, (walked, judged) in zip(NAMES, out[root]):
            assert walked == judged, (folder, name)
            listed = out[root + " listed"][name]
            assert (listed is None) == (walked[0] == "ok") and (listed is None or listed == walked[1]), (name, listed)
        refused[folder] = sorted(n for n, (w, _) in zip(NAMES, out[root]) if w[0] != "ok")
    assert refused == {"home/lib": [], "home/mine": [],  # only their owner (or nobody) writes them
                       "shared": ["attacker0.jpg", "attacker1.jpg"]}  # the owner's own links stay followed
    assert "in a folder others may write" in out[str(tree / "shared")][1][0][1]


def test_folders_that_become_writable_by_others_between_two_listings_refuse_their_links(tree):
    lib, mine, home = tree / "home" / "lib", tree / "home" / "mine", tree / "home"
    out = as_nobody_child(f"""
out["before"] = [listing({str(lib)!r}), listing({str(mine)!r})]
os.chmod({str(home)!r}, 0o777)  # lib: now a folder another user made where others may write
os.chmod({str(mine)!r}, 0o777)
out["after"] = [listing({str(lib)!r}), listing({str(mine)!r})]
out["fresh"] = [[fresh(root, n) for n in {NAMES!r}] for root in ({str(lib)!r}, {str(mine)!r})]
""")
    assert all(error is None for listed in out["before"] for error in listed.values())
    for listed, judged in zip(out["after"], out["fresh"]):
        assert [listed[n] for n in NAMES] == [None if j[0] == "ok" else j[1] for j in judged]
    lib_after, mine_after = out["after"]
    assert sorted(n for n, e in lib_after.items() if e) == [f"{w}{i}.jpg" for w in ("attacker", "owner") for i in (0, 1)]
    assert "in a folder another user made where others may write" in lib_after["owner0.jpg"]
    assert sorted(n for n, e in mine_after.items() if e) == ["attacker0.jpg", "attacker1.jpg", "owner0.jpg", "owner1.jpg"]


@pytest.mark.parametrize("change", ["folder writable", "folder above writable", "folder replaced by a link"])
def test_a_folders_judgement_kept_within_one_listing_follows_a_change_as_a_fresh_walk_does(tree, change):
    """The first link of each kind is stat'ed with every folder as the fixture made it (lib and mine trusted,
    the judgement of the walk's first folder remembered), then the folders change, then the second of each kind."""
    home = tree / "home"
    root = home / ("mine" if change == "folder writable" else "lib")
    first, second = [n for n in NAMES if n.endswith("0.jpg")], [n for n in NAMES if n.endswith("1.jpg")]
    changes = {
        "folder writable": lambda: root.chmod(0o777),
        "folder above writable": lambda: home.chmod(0o777),
        "folder replaced by a link": lambda: _replace_by_link(root, tree / "open"),
    }
    out = as_nobody_child(f"""
walks = safeopen.FolderWalks({str(root)!r})
out["first"] = [outcome(walks.stat_through, n) for n in {first!r}]
pause()
out["second"] = [[outcome(walks.stat_through, n), fresh({str(root)!r}, n)] for n in {second!r}]
""", changes[change])
    assert all(o[0] == "ok" for o in out["first"])
    for name, (walked, judged) in zip(second, out["second"]):
        assert walked == judged, (change, name)
    assert [n for n, (w, _) in zip(second, out["second"]) if w[0] != "ok"]  # the change does refuse some
