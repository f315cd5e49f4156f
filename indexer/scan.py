"""List the images of each source and say which are new, changed or gone compared with the catalog.

A source (alignsearch/media/sources.py) is a local folder, a URL prefix, a list file of paths/URLs or a
WebDataset tar shard; each lists entries with a size and a modification time, which is what a
re-run compares.
"""

from __future__ import annotations

import hashlib
import os
import time
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

from alignsearch import safeopen
from alignsearch.media import photometa, sources
from alignsearch.errors import BadInputError
from alignsearch.media.video import VIDEO_EXTENSIONS, is_video

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)
MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
JUNK_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
TRANSIENT = ("cannot stat", "cannot read")  # over a network, worth another try on the next run


def content_changed(recorded: str | None, read: str | None) -> bool:
    """Whether a file read again (`index --reindex`: a photo as it is decoded, a video before it is) holds content
    other than its row records, by their SHA-256s; the listing cannot tell (size and mtime match). Re-encoded anyway,
    a file replaced with the same size and mtime (a sync keeps them) had the new content's vectors under the old
    content's hash, and no later run, its listing matching, read it again. A row without a hash (written before
    hashes were) or a read without one (a URL's video) is taken as it is."""
    return recorded is not None and read is not None and read != recorded


def _retry(reason: str | None) -> bool:
    return (reason or "").startswith(TRANSIENT)


def _readable_again(f: Found) -> bool:
    """A local file whose read failed that this process may read now: tried again. Making a file readable
    (chmod, chown, an ACL) changes neither its size nor its mtime, so by those alone it stayed failed for good.
    Only files failed with a transient reason are asked, so a library's other files cost no system call."""
    return os.access(f.path, os.R_OK)


@dataclass(frozen=True)
class Found:
    root: str
    relpath: str  # the catalog key (sources.catalog_key): bytes that are not UTF-8 as \xNN, backslashes doubled
    size: int
    mtime: float
    error: str | None = None  # set when the entry cannot even be stat'ed (broken link, loop)
    relpath_raw: bytes | None = None  # the real bytes, only where the key is not the name
    offset: int = -1  # where a tar member's data starts in its shard
    caption: str | None = None  # from a list's caption column or a WebDataset sample's .txt/.json member
    # a local photo whose sidecar caption (photo.txt) is read again though the photo is unchanged: a symbolic link
    # (its target may be another text now), or a caption made, edited or removed since the root's last full listing
    caption_link: bool = False
    # a folder listing's name: b"" a file, else a symbolic link's target as readlink gives it (catalog.links); None: not
    # looked at (a list's entry, a tar member, a row read back from the catalog), so never a change (diff)
    link: bytes | None = None
    # the file's status change time (st_ctime), and when the listing that stat'ed it began (time.time()); None where
    # there is none to ask (a URL, a tar member, a row read back from the catalog). A row's indexed_at is the
    # listed_at of the file it was made from (row_time), so a change after that listing is seen (diff: status_changed)
    ctime: float | None = None
    listed_at: float | None = None

    @property
    def path(self) -> str:
        return sources.location(self.root, self.relpath, self.relpath_raw)

    def read(self) -> bytes:
        return sources.read_bytes(self.root, self.relpath, self.relpath_raw, self.offset, self.size)


def printable(relpath: str) -> tuple[str, bytes | None]:
    """(the catalog key, text SQLite can store, lossless; the raw bytes where the key is not the name:
    sources.catalog_key)."""
    return sources.catalog_key(relpath)


def at_or_under(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or inside it (paths as text, no file system asked; "/" holds every path)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _wanted(relpath: str, include_hidden: bool) -> bool:
    """An image by its extension, not junk, not hidden (nor under a hidden folder) unless asked."""
    parts = relpath.split("/")
    name = parts[-1]
    if name in JUNK_NAMES or name.startswith("._") or os.path.splitext(name)[1].lower() not in MEDIA_EXTENSIONS:
        return False
    return include_hidden or not any(_hidden(part) for part in parts if part not in (".", ""))


def max_bytes(name: str) -> int:
    """The largest file accepted: images are read whole, videos stream (alignsearch/media/video.py), so any size."""
    return 1 << 62 if is_video(name) else sources.MAX_FILE_BYTES


@dataclass(frozen=True)
class ListingError:
    """A folder whose entries could not be listed (permissions, I/O, a mount that blinked): the files the
    catalog holds under it are kept, not taken for deleted."""

    folder: str  # relative to the root; "" is the root itself
    reason: str


def scan(root: str, include_hidden: bool = False, list_column: str | None = None,
         errors: list[ListingError] | None = None, caption_column: str | None = None,
         skip: str | None = None, folders: tuple[str, ...] | None = None,
         links: list[str] | None = None, folder_links: list[str] | None = None, *,
         mounts: dict[str, int] | None = None, captions_since: float | None = None,
         captions_unread: dict[str, float] | None = None, captions_read: dict[str, float] | None = None,
         lists: dict | None = None) -> Iterator[Found]:
    """The images of one source (a catalog root, as sources.normalise names it), in a stable order.
    Folders that cannot be listed are appended to `errors` (a whole source that cannot be listed raises).
    skip: a folder never listed (the index's own, whose thumbnail cache is no photo library). folders: of a
    folder root, only the images under these (relative, as `listable` gives them); None the whole root. links:
    of a folder root, each folder listed that holds a link to a file the indexer reads, or to a caption, is
    appended; folder_links: each link to a folder met (relative); mounts: of a folder root, {folder: st_dev} of
    each folder listed with entries on another device than the folder above it (a drive mounted inside the root);
    captions_since, captions_unread, captions_read: of a folder root, up to when its captions were read (see
    scan_folder). lists: of a list root, the run's tables of lists (sources.list_table), the one privacy judged."""
    kind = sources.kind(root)
    if kind == sources.PREFIX:
        return scan_prefix(root, include_hidden)
    if kind == sources.LIST:
        return scan_list(root, list_column, caption_column=caption_column, lists=lists)
    if kind == sources.TAR:
        return scan_tar(root, include_hidden)
    return scan_folder(root, include_hidden, errors, skip, folders, links, folder_links, mounts=mounts,
                       captions_since=captions_since, captions_unread=captions_unread, captions_read=captions_read)


def scan_prefix(root: str, include_hidden: bool = False) -> Iterator[Found]:
    """Objects under a URL prefix, listed through fsspec."""
    fs, base = sources.filesystem(root)
    base = base.rstrip("/")
    infos = fs.find(base, detail=True)
    for name in sorted(infos):
        info = infos[name]
        relpath, raw = printable(name[len(base):].lstrip("/"))
        if info.get("type", "file") == "file" and _wanted(relpath, include_hidden):
            size = int(info.get("size") or 0)
            error = sources.too_large(size) if size > max_bytes(relpath) else None
            yield Found(root, relpath, size, sources.info_mtime(info), error, raw)


def scan_list(root: str, column: str | None = None, threads: int = 16,
              caption_column: str | None = None, lists: dict | None = None) -> Iterator[Found]:
    """Every entry of a list file, in its order, duplicates once. Entries are not filtered by extension
    (the list says what is an image); one that cannot be stat'ed is reported with its reason. Captions
    come from caption_column, else a column named caption/text/alt. lists: the run's tables of lists
    (sources.list_table): the table read when the index folder was judged (privacy.py) is the one listed, and
    dropped from it once listed (a list of 1M entries held no longer than its listing); None: read here."""
    base = os.path.dirname(root)
    table, listed = sources.list_table(root, lists), sources.list_entries(root, column, lists)
    if lists is not None:
        lists.pop(root, None)
    captions = sources.list_captions(root, column, caption_column, table)
    entries = {}
    for raw in listed:
        entry = raw.strip()
        if not sources.is_url(entry):
            entry = os.path.normpath(os.path.join(base, entry)) if not sources.is_url(base) else f"{base}/{entry}"
        entries.setdefault(entry, captions.get(raw.strip()))
    with ThreadPoolExecutor(threads) as pool:  # remote stats are round trips: overlap them
        for found, caption in zip(pool.map(lambda entry: _stat_entry(root, entry), entries), entries.values()):
            yield replace(found, caption=caption) if caption else found


def _stat_entry(root: str, entry: str) -> Found:
    relpath, raw = printable(entry)
    try:
        local = sources.file_path(entry) if sources.is_url(entry) else entry  # file:// is a local file
        if local is None:
            fs, inner = sources.filesystem(entry)
            info = fs.info(inner)
            return Found(root, relpath, int(info.get("size") or 0), sources.info_mtime(info), relpath_raw=raw)
        listed_at = time.time()
        st = os.stat(local)
        problem = sources.unusable(st, max_bytes(local))
        if problem:
            return Found(root, relpath, st.st_size, st.st_mtime, problem, raw, ctime=st.st_ctime, listed_at=listed_at)
    except BadInputError as exc:
        return Found(root, relpath, 0, 0.0, str(exc), raw)
    except (OSError, ValueError) as exc:
        reason = "file not found" if isinstance(exc, FileNotFoundError) else f"cannot stat: {exc}"
        return Found(root, relpath, 0, 0.0, reason, raw)
    return Found(root, relpath, st.st_size, st.st_mtime, None, raw, ctime=st.st_ctime, listed_at=listed_at)


def scan_tar(root: str, include_hidden: bool = False) -> Iterator[Found]:
    """Image members of a WebDataset shard, with their data offsets (read later without a re-scan)."""
    images, captions = [], {}
    try:
        with sources.open_binary(root) as f:
            shard = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115 - reads f, closed by the with
            for member in shard:
                name = member.name.removeprefix("./")
                if member.isfile() and _wanted(name, include_hidden):
                    relpath, raw = printable(name)
                    error = sources.too_large(member.size) if member.size > sources.MAX_FILE_BYTES else None
                    images.append(Found(root, relpath, member.size, float(member.mtime), error, raw, member.offset_data))
                elif member.isfile() and name.lower().endswith(".txt"):  # a long one is cut, not dropped
                    text = shard.extractfile(member).read(photometa.CAPTION_BYTES)
                    captions[_sample_key(name)] = photometa.caption_from_member(name, text)
                elif member.isfile() and name.lower().endswith(".json") and member.size <= photometa.CAPTION_JSON_BYTES:
                    captions[_sample_key(name)] = photometa.caption_from_member(name, shard.extractfile(member).read())
    except tarfile.TarError as exc:
        raise BadInputError(f"cannot read the tar shard {root}: {exc}") from None
    for found in images:  # a sample's caption member may come before or after its image
        caption = captions.get(_sample_key(found.relpath))
        yield replace(found, caption=caption) if caption else found


def _sample_key(name: str) -> str:
    """A WebDataset sample's key: the member's folder and name up to the name's first dot."""
    folder, _, base = name.rpartition("/")
    return f"{folder}/{base.split('.', 1)[0]}"


def relinked(root: str, real: str, is_link: bool) -> str | None:
    """Why a folder root is not listed when its path no longer leads to the folder itself (the root, or a folder
    above it, swapped for a symbolic link), else None. Folder roots are recorded as real paths
    (sources.normalise), so any difference is such a swap: a listing error, whose rows are kept."""
    if real == root:
        return None
    how = "is now a symbolic link" if is_link else "is now reached through a symbolic link (a folder above it)"
    return f"{root} {how} to {real}: index {real} as a root, or forget this one (`alignsearch forget {root}`)"


def listable(root: str, folder: str, include_hidden: bool, skip: str | None) -> str:
    """The folder (relative to a folder root, "" the root) whose listing shows what is at `folder` as a listing of
    the whole root would: `folder` itself when that listing reaches it (a real folder, not a link nor through one,
    not hidden unless the root includes hidden files, not the index's own), else the nearest folder above it that
    is so. A folder gone, replaced by a file or a link, or moved away: its parent's listing shows it gone."""
    while folder:
        path = os.path.join(root, folder)
        hidden = not include_hidden and any(_hidden(part) for part in folder.split(os.sep))
        if not hidden and not (skip and at_or_under(path, skip)) and os.path.isdir(path) and \
                os.path.realpath(path) == path:
            return folder
        folder = os.path.dirname(folder)
    return ""


def scan_folder(root: str, include_hidden: bool = False, errors: list[ListingError] | None = None,
                skip: str | None = None, folders: tuple[str, ...] | None = None,
                links: list[str] | None = None, folder_links: list[str] | None = None, *,
                mounts: dict[str, int] | None = None, captions_since: float | None = None,
                captions_unread: dict[str, float] | None = None,
                captions_read: dict[str, float] | None = None) -> Iterator[Found]:
    """Image files under a folder, by extension, sorted (a folder's files, then its subfolders). folders: only
    those under these folders (relative, each one `listable` gives, none under another), in their order. links:
    each folder listed that holds a link to a wanted file or a caption (.txt) is appended (relative, "" the root);
    folder_links: each link to a folder met (relative), which a listing never walks. mounts: {folder: st_dev} of
    each folder listed with entries in it on another device than its parent (relative; a drive mounted inside the
    root), so a later run can tell the empty folder an unmount leaves from one the user emptied (indexer/roots.py).
    captions_since: when the root's last full listing started (time.time()); a photo whose sidecar caption was made
    or edited since (its time), or whose folder changed since (a caption removed or renamed), is yielded with
    caption_link set: an unchanged photo's caption is read again (indexer/photos.py recaption), as a caption changes
    neither the photo's size nor its time. None: only caption links are. captions_unread: {folder: time} of the
    folders that listing could not list, whose captions (those under them too) count as read up to that time only.
    captions_read: {folder: time} of the folders a listing of some folders of the root (`index --watch`) listed
    since, every folder under them too: their captions count as read up to that time.

    Directory symlinks are not followed (no loops); file symlinks are, and a broken one is reported with
    an error, as are FIFOs, devices and sockets named like images and files over sources.MAX_FILE_BYTES
    (found from a stat, never opened). A folder that cannot be listed is appended to `errors`, never
    silently skipped: its files must not look deleted. So is a root whose path is now a link (see relinked).
    """
    listed_at = time.time()  # before any stat: a file changed after it is changed after its row's indexed_at
    walks = safeopen.FolderWalks(root)  # each folder walked once for all its links (opens nothing until then)
    moved = relinked(root, str(Path(root).resolve()), os.path.islink(root))
    if moved:
        # listed through the link, its files would be indexed under a root the index does not know
        if errors is not None:
            errors.append(ListingError("", moved))
        return
    pending = list(reversed(folders)) if folders else [""]
    # {folder: (its st_dev, when it last changed, its parent's st_dev)}, asked only when mounts or captions are
    # wanted: one lstat per folder serves both, none per file (the root's own device is recorded by the run:
    # indexer/roots.py DEVICE)
    looked = mounts is not None or captions_since is not None
    stats = {rel: (*folder_stat(os.path.join(root, rel) if rel else root),
                   folder_device(os.path.dirname(os.path.join(root, rel))) if rel else None)
             for rel in pending} if looked else {}
    while pending:
        rel = pending.pop()
        folder = os.path.join(root, rel) if rel else root
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if errors is not None:
                errors.append(ListingError(rel, f"cannot list: {exc.strerror or exc}"))
            continue
        if mounts is not None and rel and entries and None not in (stats[rel][0], stats[rel][2]) and \
                stats[rel][0] != stats[rel][2] and printable(rel)[1] is None:
            mounts[rel] = stats[rel][0]
        subfolders = []
        linked_captions = {e.name for e in entries if e.name.endswith(".txt") and e.is_symlink()}
        if captions_since is not None:
            since = min([captions_since] + [t for f, t in (captions_unread or {}).items() if at_or_under(rel, f)])
            since = max([since] + [t for f, t in (captions_read or {}).items() if at_or_under(rel, f)])
            texts = {e.name: e for e in entries if e.name.endswith(".txt")}
            folder_changed = stats[rel][1] >= since - CHANGED_SLACK_S  # changed_since, from the lstat above
        if links is not None and linked_captions:
            links.append(rel)
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows symlinks: a link to a folder is neither walked nor a file
            except OSError:
                is_dir = False
            if is_dir:
                if entry.is_symlink():
                    if folder_links is not None:
                        folder_links.append(os.path.join(rel, entry.name) if rel else entry.name)
                elif (include_hidden or not _hidden(entry.name)) and entry.path != skip:
                    subfolders.append(os.path.join(rel, entry.name) if rel else entry.name)
                    if looked:
                        stats[subfolders[-1]] = (*folder_stat(entry.path), stats[rel][0])
                continue
            if not _wanted(entry.name, include_hidden):
                continue
            name = os.path.join(rel, entry.name) if rel else entry.name
            if links is not None and entry.is_symlink() and (not links or links[-1] != rel):
                links.append(rel)
            relpath, raw = printable(name)
            caption = os.path.splitext(entry.name)[0] + ".txt"
            caption_link = caption in linked_captions or (captions_since is not None and (
                folder_changed or (caption in texts and changed_since(texts[caption].path, since))))
            target = link_target(entry)
            try:
                # a link is followed as it is read (safeopen): one another user planted is no file of the library
                st = walks.stat_through(name) if entry.is_symlink() else os.stat(entry.path)
            except safeopen.Refused as exc:
                # the link's own size and time: a row indexed through it (before links were judged) is replaced
                link = entry.stat(follow_symlinks=False)  # scandir's, cached
                yield Found(root, relpath, link.st_size, link.st_mtime, str(exc), raw, caption_link=caption_link,
                            link=target)
                continue
            except OSError as exc:
                broken = os.path.islink(entry.path) and exc.errno == 2
                yield Found(root, relpath, 0, 0.0, "broken symlink" if broken else f"cannot stat: {exc.strerror or exc}", raw,
                            link=target)
                continue
            yield Found(root, relpath, st.st_size, st.st_mtime, sources.unusable(st, max_bytes(relpath)), raw,
                        caption_link=caption_link, link=target, ctime=st.st_ctime, listed_at=listed_at)
        pending.extend(reversed(subfolders))
    walks.close()


def link_target(entry: os.DirEntry) -> bytes:
    """Found.link of a listed name: b"" for a file (scandir's type, no system call), a link's target (one readlink;
    a link unreadable meanwhile: b"?", never a target readlink gives)."""
    if not entry.is_symlink():
        return b""
    try:
        return os.fsencode(os.readlink(entry.path))
    except OSError:
        return b"?"


@dataclass
class Diff:
    todo: list[Found] = field(default_factory=list)  # new or changed: to decode and encode
    changed_ids: list[int] = field(default_factory=list)  # catalog ids replaced by re-encoding
    removed: list = field(default_factory=list)  # catalog rows whose file is gone
    unchanged: int = 0
    kept: int = 0  # rows not seen because their folder could not be listed: kept as they are
    # (found, its row) whose size and mtime match but whose status changed since its listing (status_changed): hashed
    # by `confirm`, changed only where the content is not the one recorded
    suspects: list = field(default_factory=list)


def _under(relpath: str, folders: list[str]) -> bool:
    return any(not folder or relpath == folder or relpath.startswith(folder + "/") for folder in folders)


def diff(found: list[Found], known: dict, unlisted: list[str] = (), links: dict | None = None) -> Diff:
    """Compare one root's scan with its catalog rows (relpath -> FileRow) by size and mtime, and each listed name's
    link (Found.link) with the one its row records (links: catalog.links_of's {file id: target}; None: none known). Rows
    under the `unlisted` folders (relative; "" is the whole root) that the scan did not see are kept."""
    out, now = Diff(), time.time()
    unlisted = [printable(folder)[0] for folder in unlisted]
    seen = set()
    for f in found:
        seen.add(f.relpath)
        row = known.get(f.relpath)
        if row is None:
            out.todo.append(f)
        elif _retry(f.error) and row.status == "indexed":
            out.unchanged += 1  # a network blip must not throw a good vector away
        elif row.size != f.size or row.mtime != f.mtime or (f.error and row.status == "indexed") or (
                _retry(row.reason) and (sources.is_url(f.path) or _readable_again(f))) or relinked_name(f, row, links):
            out.todo.append(f)
            out.changed_ids.append(row.id)
        elif f.error is None and status_changed(f, row.indexed_at, now):  # one the listing refuses (too large, not
            # a regular file) as its row records, its size and mtime the same, is not read: hashing it (gigabytes)
            # learnt nothing the pipeline would not refuse again
            out.suspects.append((f, row))
        else:
            out.unchanged += 1
    gone = [row for rel, row in known.items() if rel not in seen]
    out.removed = [row for row in gone if not _under(row.relpath, unlisted)] if unlisted else gone
    out.kept = len(gone) - len(out.removed)
    return out


def status_changed(f: Found, indexed_at: float, now: float) -> bool:
    """Whether a file's status changed (st_ctime) after the listing its row was made from began (indexed_at): its
    content may differ though its size and mtime do not. `cp -p` or `rsync -a` of another file of the same size over
    it, `exiftool -P` rewriting a tag in place, keep both: the old content's vectors and hash stayed for good, by
    `index` and by the server. No tool sets a ctime; a chmod, chown or rename changes it too, so such a file is read
    and hashed again, once, and keeps its vectors when its content is the same (pipeline: `known` hashes). A ctime
    ahead of this machine's clock (`now`, give or take CHANGED_SLACK_S: a file server's clock, one set wrong when
    the file changed) says nothing: it would be "changed" at every run until the clock caught up."""
    return f.ctime is not None and safeopen.status_changed(f.ctime, indexed_at, now)


def confirm(suspects: list[tuple[Found, object]], threads: int = 8) -> tuple[list[Found], list[Found]]:
    """(the suspects whose bytes hash to their row's SHA-256: unchanged, their rows' indexed_at to be moved to this
    listing; those whose bytes hash otherwise, or whose row has no hash to compare: changed, read again) of diff's
    suspects. Only the hash is compared: a chmod of a library, a backup restored, a folder renamed on some
    filesystems change every file's ctime, and re-encoding them, or taking their rows' photo fields, OCR text and
    tags away with a new row, would cost hours for nothing. A suspect that cannot be read now (`chmod 000`, a share
    gone) is in neither: unchanged, as its size and mtime say, and hashed again by the next run; read as changed, its
    good row was replaced by a failed one ("cannot read"), its vectors and photo fields gone until it was readable."""
    with ThreadPoolExecutor(threads) as pool:  # reads overlap: a disk queue, a network filesystem's round trips
        hashes = list(pool.map(lambda pair: content_sha256(pair[0]), suspects))
    read = [(f, row, h) for (f, row), h in zip(suspects, hashes) if h is not None]
    return [f for f, row, h in read if h == row.sha256], [f for f, row, h in read if h != row.sha256]


def content_sha256(f: Found) -> str | None:
    """The SHA-256 of a local file's bytes as they are now, opened under its root as every indexed file is
    (safeopen: no link planted on the way, a regular file, a FIFO never blocks), read in chunks (a video of
    gigabytes); None where it cannot be read: the run reads it again as changed and says why."""
    local = sources.local_file(f.root, f.relpath, f.relpath_raw)
    if local is None:
        return None
    try:
        with os.fdopen(safeopen.open_under(*local, follow_last=True), "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except (OSError, safeopen.Refused):
        return None


def row_time(f: Found) -> dict:
    """The indexed_at of a row made from f: when its listing began, so a change after it is seen (status_changed);
    {} where f has none (a row written now: catalog.insert_file's time)."""
    return {} if f.listed_at is None else {"indexed_at": f.listed_at}


def relinked_name(f: Found, row, links: dict | None) -> bool:
    """Whether a listed name's link differs from the one its row records: a link that became a file, a file that
    became a link, a link pointed elsewhere. The size and time are the target's, so these can leave both as they
    were. A name not looked at (f.link None) never differs."""
    return f.link is not None and links is not None and links.get(row.id, b"") != f.link


CHANGED_SLACK_S = safeopen.STATUS_SLACK_S


def changed_since(path: str, since: float) -> bool:
    """Whether a file or folder (not followed if a link) was modified, or its status changed (a rename over it, an
    entry made or removed in a folder), at or after `since`, give or take CHANGED_SLACK_S."""
    return folder_stat(path)[1] >= since - CHANGED_SLACK_S


def folder_stat(path: str) -> tuple[int | None, float]:
    """(st_dev, when it last changed: the later of its modification and status change times) of a folder or file,
    not following a link, from one lstat; (None, -inf) when it cannot be asked."""
    try:
        st = os.lstat(path)
    except OSError:
        return None, float("-inf")
    return st.st_dev, max(st.st_mtime, st.st_ctime)


def folder_device(path: str) -> int | None:
    """A folder's st_dev, not following a link; None when it cannot be asked."""
    return folder_stat(path)[0]


def empty_folder(folder: str, *, include_hidden: bool = False) -> bool:
    """Whether a folder holds no entry, or only hidden ones where a listing skips them (include_hidden False); False
    when it cannot be listed: not known to be empty. An unplugged drive's mount point often holds a marker on the
    disk below (`.not-mounted`, a file manager's `.DS_Store`): taken for a folder emptied, the drive's files were
    removed."""
    try:
        with os.scandir(folder) as it:
            return all(not include_hidden and _hidden(e.name) for e in it)
    except OSError:
        return False
