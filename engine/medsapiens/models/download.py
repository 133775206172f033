"""Catalogue name -> a verified local file: download (Google Drive's confirm page, HTTP Range resume, progress),
the zip member to keep, and its SHA256 (pinned at first download where the catalogue has none).

Files live in the cache (catalogue.cache_dir()) as `<name>/<file>`, a pinned hash beside them as `<file>.sha256`;
an unfinished download waits in `downloads/` and the next attempt resumes it. Offline sites set
MEDSAPIENS_OFFLINE=1 (no network attempt) and bring files in with add_local (`medsapiens models add`).
"""
from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from html.parser import HTMLParser
from pathlib import Path

from ..errors import InputError
from ..io.atomic import atomic_write, atomic_write_text
from ..io.checksum import remember, sha256_of
from ..progress import Callback, Cancel, check, report
from .catalogue import (
    PIN_ON_FIRST_DOWNLOAD,
    Choice,
    Entry,
    cache_dir,
    catalogue,
    lookup,
    register_user_model,
)

CHUNK = 1 << 20
USER_AGENT = "medsapiens (python urllib)"


def offline() -> bool:
    return os.environ.get("MEDSAPIENS_OFFLINE", "") not in ("", "0")


def resolve(model: str, progress: Callback = None, cancel: Cancel = None) -> tuple[Path, Choice | None]:
    """A local file for `model` and, for a catalogue name (`NAME` or `NAME:SET`), what the catalogue says of it;
    a download reports its bytes as progress (step / total) and stops on cancel()."""
    if Path(model).is_file():
        return Path(model), None
    choice = lookup(model)
    if choice is None:
        names = ", ".join(catalogue())
        raise InputError(f"{model}: neither a file nor a catalogue model (catalogue: {names})")
    return fetch(choice.entry, progress, cancel), choice


def downloads_needed(model: str) -> list[Entry]:
    """The entries that resolving `model` and its base would download (none for files and cached models)."""
    if Path(model).is_file():
        return []
    choice = lookup(model)
    if choice is None:
        return []
    entries = catalogue()
    chain = [choice.entry] + ([entries[choice.entry.base]] if choice.entry.base in entries else [])
    return [e for e in chain if not cached_path(e).is_file()]


def cached_path(entry: Entry) -> Path:
    return cache_dir() / entry.name / entry.filename


def pinned_sha256(entry: Entry) -> str | None:
    """The SHA256 the kept file must have: the catalogue's, else the one recorded at first download."""
    if entry.sha256 != PIN_ON_FIRST_DOWNLOAD:
        return entry.sha256
    pin = _pin_path(entry)
    return pin.read_text().strip() if pin.is_file() else None


def _pin_path(entry: Entry) -> Path:
    target = cached_path(entry)
    return target.with_name(target.name + ".sha256")


def fetch(entry: Entry, progress: Callback = None, cancel: Cancel = None) -> Path:
    """The entry's verified file in the cache, downloaded first if it is not there."""
    target = cached_path(entry)
    if target.is_file():
        _verify(target, pinned_sha256(entry))
        return target
    if entry.source.kind == "local":
        raise InputError(f"{entry.name}: the added file {target} is gone; add it again (medsapiens models add)")
    if offline():
        raise InputError(f"{entry.name}: not in the cache ({target}) and MEDSAPIENS_OFFLINE is set; download "
                         f"{entry.source.url} elsewhere and add it with `medsapiens models add FILE`")
    download = _download(entry, progress, cancel)
    try:
        if entry.source.member:  # every model of the zip is kept, so that one download serves them all
            siblings = [e for e in catalogue().values() if e.source.url == entry.source.url and e.source.member
                        and e.name != entry.name and not cached_path(e).is_file()]
            _keep_members(download, [entry, *siblings], required=entry)
        else:
            _keep(entry, lambda: open(download, "rb"), download)
    finally:
        download.unlink(missing_ok=True)  # kept, or refused: a bad download is never resumed
    return target


def _verify(target: Path, expected: str | None) -> None:
    """Refuse a cached file whose SHA256 is not the pinned one (hashed once per version of the file)."""
    if expected and sha256_of(target) != expected:
        raise InputError(f"{target}: cached file does not match its SHA256 {expected[:12]}...; delete it to "
                         "download again")


def add_local(path, name: str | None = None) -> list[str]:
    """Bring a model file, or the release zip, into the cache for sites without network; returns the names added.

    A zip holding catalogue members keeps each of them (or only `name`). A single file is kept as the catalogue
    entry `name`, or as the entry whose file name it has; any other file becomes a user model called `name`
    (default: the file's stem), listed with the catalogue from then on. SHA256s are checked where the catalogue
    pins them and pinned otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if name is not None and ":" in name:
        raise InputError(f"--name {name}: a model name has no ':' (that selects a landmark set)")
    entries = catalogue()
    zipped = [e for e in entries.values() if e.source.member and name in (None, e.name)]
    if zipfile.is_zipfile(path) and _members(path, zipped):
        return _keep_members(path, zipped, required=entries.get(name))
    entry = entries.get(name) if name else next((e for e in entries.values() if e.filename == path.name), None)
    if entry is None:
        entry = register_user_model(name or path.stem, path.resolve().as_uri(), sha256_of(path))
    _keep(entry, lambda: open(path, "rb"), path)
    return [entry.name]


def _members(zip_path: Path, entries) -> dict[str, str]:
    """Entry name -> zip member, for the entries whose member the zip holds (full path, or the end of one)."""
    names = [n for n in zipfile.ZipFile(zip_path).namelist() if not n.startswith("__MACOSX/")]
    found = {}
    for e in entries:
        hits = [n for n in names if n == e.source.member or n.endswith("/" + e.source.member)]
        if len(hits) == 1:
            found[e.name] = hits[0]
    return found


def _keep_members(zip_path: Path, entries, required: Entry | None) -> list[str]:
    members = _members(zip_path, entries)
    if required is not None and required.name not in members:
        raise InputError(f"{zip_path}: holds no {required.source.member} (the file of {required.name})")
    try:
        with zipfile.ZipFile(zip_path) as z:
            for entry in entries:
                if entry.name in members:  # zipfile checks each member's CRC-32 as it is read
                    _keep(entry, lambda m=members[entry.name]: z.open(m), f"{zip_path}:{members[entry.name]}")
    except (zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"{zip_path}: damaged zip ({e}); the file was discarded") from None
    return [e.name for e in entries if e.name in members]


def _keep(entry: Entry, open_source, what) -> None:
    """Copy the source to the entry's cache path, hashing on the way: a wrong SHA256 is refused (nothing kept),
    an unknown one is pinned beside the file and reported."""
    digest = hashlib.sha256()

    def write(tmp):
        with open_source() as src, open(tmp, "wb") as out:
            while block := src.read(CHUNK):
                digest.update(block)
                out.write(block)
        expected = pinned_sha256(entry)
        if expected and digest.hexdigest() != expected:
            raise InputError(f"{what}: SHA256 {digest.hexdigest()[:12]}... but {entry.name} expects "
                             f"{expected[:12]}...; the file was discarded")

    atomic_write(cached_path(entry), write)
    remember(cached_path(entry), digest.hexdigest())  # hashed on the way in
    if entry.sha256 == PIN_ON_FIRST_DOWNLOAD and not _pin_path(entry).is_file():
        atomic_write_text(_pin_path(entry), digest.hexdigest() + "\n")
        print(f"{entry.name}: SHA256 {digest.hexdigest()} pinned in {_pin_path(entry)}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- HTTP
def _download(entry: Entry, progress: Callback, cancel: Cancel) -> Path:
    """The complete download of the entry's source, resuming an earlier partial one with an HTTP Range request."""
    key = hashlib.sha256(entry.source.url.encode()).hexdigest()[:16]
    part = cache_dir() / "downloads" / f"{key}.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    url = entry.source.url
    try:
        for _ in range(3):  # Google Drive: the file, or a confirm page that leads to it
            have = part.stat().st_size if part.is_file() else 0
            headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={have}-"} if have else {})}
            try:
                response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
            except urllib.error.HTTPError as e:
                if e.code == 416 and have:  # the partial file is not a prefix of this one: start again
                    part.unlink()
                    continue
                raise
            with response:
                if entry.source.kind == "google-drive" and response.headers.get_content_type() == "text/html":
                    url = _drive_confirm_url(response.read().decode("utf-8", "replace"), response.url, entry)
                    continue
                start = have if response.status == 206 and _range_start(response) == have else 0
                total = _total(response, start)
                _stream(response, part, start, total, entry.name, progress, cancel)
            return part
        raise InputError(f"{entry.name}: {entry.source.url} kept answering with pages instead of the file")
    except (urllib.error.URLError, OSError) as e:
        got = part.stat().st_size if part.is_file() else 0
        kept = f"; {got} bytes kept, run again to resume" if got else ""
        raise InputError(f"{entry.name}: download from {entry.source.url} failed "
                         f"({getattr(e, 'reason', None) or e}){kept}") from None


def _range_start(response) -> int | None:
    value = response.headers.get("Content-Range", "")  # bytes START-END/TOTAL
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _total(response, start: int) -> int | None:
    length = response.headers.get("Content-Length")
    return start + int(length) if length and length.isdigit() else None


def _stream(response, part: Path, start: int, total: int | None, label: str, progress: Callback,
            cancel: Cancel) -> None:
    """Append the response to the partial download (kept on Cancel, so that the next attempt resumes it)."""
    done = start
    with open(part, "ab" if start else "wb") as out:
        while block := response.read(CHUNK):
            check(cancel, "download cancelled")
            out.write(block)
            done += len(block)
            of = f" of {total / 2 ** 20:.0f}" if total else ""
            report(progress, done / total if total else 0.0, f"downloading {label}: {done / 2 ** 20:.0f}{of} MB",
                   phase="download", step=done, total=total)
    if total is not None and done < total:
        raise ConnectionError(f"connection closed after {done} of {total} bytes")


class _DrivePage(HTMLParser):
    """What Google Drive's "can't scan this file for viruses" page offers: the download form or a confirm link."""

    def __init__(self):
        super().__init__()
        self.action, self.fields, self.link, self.error, self._in_form, self._in_error = None, {}, None, "", False, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form" and a.get("id") == "download-form":
            self.action, self._in_form = a.get("action"), True
        elif tag == "input" and self._in_form and a.get("type") == "hidden" and a.get("name"):
            self.fields[a["name"]] = a.get("value", "")
        elif tag == "a" and "confirm=" in (a.get("href") or "") and "export=download" in a.get("href", ""):
            self.link = self.link or a["href"]
        elif tag == "p" and "uc-error-subcaption" in (a.get("class") or ""):
            self._in_error = True

    def handle_endtag(self, tag):
        if tag == "form":
            self._in_form = False
        elif tag == "p":
            self._in_error = False

    def handle_data(self, data):
        if self._in_error:
            self.error += data


def _drive_confirm_url(html: str, page_url: str, entry: Entry) -> str:
    """The URL behind Drive's confirm page: the form's action with its hidden fields (id, export, confirm, uuid)."""
    page = _DrivePage()
    page.feed(html)
    if page.action:
        parts = urllib.parse.urlsplit(urllib.parse.urljoin(page_url, page.action))
        query = dict(urllib.parse.parse_qsl(parts.query))
        query.update(page.fields)
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
    if page.link:
        return urllib.parse.urljoin(page_url, page.link)
    reason = page.error.strip() or "no download form on the page"
    raise InputError(f"{entry.name}: Google Drive did not hand out the file ({reason}); download "
                     f"{entry.source.url} in a browser and add it with `medsapiens models add FILE`")
