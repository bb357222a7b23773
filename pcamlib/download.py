"""Download the official PatchCamelyon release (Zenodo record 2546921), safely.

Every file is downloaded to ``<dest>/<download name>.part``, resumed with an HTTP
``Range`` request when a part file is already there, checked against its MD5, and, for
the gzip-compressed HDF5 files, decompressed as a stream to ``<dest>/.<name>.partial``
(checked against the decompressed MD5 on the fly). Final names appear only through an
atomic :func:`os.replace` after verification, so a complete file is never overwritten
and a half-written one never carries a final name.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.client
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from pcamlib import __version__
from pcamlib.errors import InputError, StepError
from pcamlib.pcam import PCAM_FILES, SPLITS, ZENODO_URL, PCamFile, check_split

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("x", "y", "meta")
"""File kinds of one split: images, labels and the meta CSV."""

GZIP_MAGIC = b"\x1f\x8b"
"""First two bytes of every gzip file."""

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_RETRY_STATUSES = {408, 425, 429}
_MAX_DELAY = 60.0


class DownloadError(StepError):
    """A download failed; the message names the URL or file, what was expected and found."""


class _Retryable(Exception):
    """A transient failure (server error, dropped connection): worth another attempt."""


def _write_chunk(fh: BinaryIO, data: bytes) -> None:
    """Write ``data`` to ``fh``; every byte this module writes goes through here."""
    fh.write(data)


def _fmt_bytes(n: int) -> str:
    if n < 1024:
        return f"{n:,} bytes"
    value, units = n / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value, units = value / 1024, units[1:]
    return f"{value:.1f} {units[0]} ({n:,} bytes)"


def _free_space(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _free_text(path: Path) -> str:
    free = _free_space(path)
    return "unknown" if free is None else _fmt_bytes(free)


def md5_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """MD5 of a file, read in chunks (constant memory).

    Args:
        path: The file.
        chunk_size: Bytes read at a time.

    Returns:
        The hexadecimal digest.
    """
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _starts_with_gzip_magic(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def _looks_like_html(head: bytes) -> bool:
    return head.lstrip()[:1] == b"<"


def _html_error(url: str, spec: PCamFile, content_type: str, head: bytes) -> DownloadError:
    expected = "gzip data" if spec.compressed else "a CSV file"
    snippet = head.lstrip()[:80].decode("utf-8", "replace")
    return DownloadError(
        f"{url}: received an HTML page instead of {expected} for {spec.download_name} "
        f"(Content-Type {content_type or 'not given'}, body starts with {snippet!r}); this is "
        "usually a Zenodo error, maintenance or login page. None of it was kept; try again "
        "later or check the address."
    )


def _write_error(err: OSError, path: Path, what: str, needed: int | None) -> DownloadError:
    """Turn an OSError raised while writing the part file ``path`` into a DownloadError."""
    if err.errno in _DISK_FULL:
        need = "an unknown amount" if needed is None else f"at least {_fmt_bytes(needed)}"
        return DownloadError(
            f"disk full while {what} {path}: it needs {need} more free space in "
            f"{path.parent} (free now: {_free_text(path.parent)}). What was received is kept "
            f"in {path.name} and the next run resumes from there: free up space and run "
            f"again. [{err}]"
        )
    return DownloadError(f"cannot write {path} while {what}: {err}")


def _decompressed_size_hint(gz_path: Path) -> int | None:
    """Lower bound on the decompressed size of a gzip file, from its ISIZE trailer.

    ISIZE is the size modulo 2**32; deflate never expands data by more than a small
    fraction, so the smallest value congruent to ISIZE that is not below (almost) the
    compressed size is a safe lower bound, and exact for the PCam files.
    """
    try:
        size = gz_path.stat().st_size
        with open(gz_path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            isize = int.from_bytes(fh.read(4), "little")
    except OSError:
        return None
    floor = max(0, int(size * 0.999) - 1024)
    if isize >= floor:
        return isize
    return isize + -(-(floor - isize) // 2**32) * 2**32


class _Fetcher:
    """Resumable download of one URL to a part file."""

    def __init__(
        self,
        url: str,
        part: Path,
        spec: PCamFile,
        *,
        timeout: float,
        progress: bool,
        chunk_size: int,
    ):
        self.url, self.part, self.spec = url, part, spec
        self.timeout, self.progress, self.chunk_size = timeout, progress, chunk_size

    def _open(self, offset: int) -> http.client.HTTPResponse:
        headers = {"User-Agent": f"pcamlib/{__version__}", "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(self.url, headers=headers)
        return urllib.request.urlopen(request, timeout=self.timeout)  # noqa: S310

    def attempt(self) -> str | None:
        """Try once to complete the part file.

        Returns:
            The MD5 of the complete part file, or None when the attempt found the part
            file bogus and removed it (start again at once).

        Raises:
            _Retryable: on a transient failure; the part file keeps what was received.
            DownloadError: on a permanent failure.
        """
        part, spec, url = self.part, self.spec, self.url
        offset = part.stat().st_size if part.exists() else 0
        if offset and spec.compressed and not _starts_with_gzip_magic(part):
            log.warning("%s: not gzip data, discarding it and starting from zero", part)
            part.unlink()
            offset = 0
        try:
            response = self._open(offset)
        except urllib.error.HTTPError as err:
            err.close()
            if err.code == 416 and offset:
                return self._range_not_satisfiable(offset)
            status = f"HTTP {err.code} {err.reason}"
            if err.code == 404:
                raise DownloadError(
                    f"{url}: {status}: {spec.download_name} does not exist at this address "
                    "(check the URL template and the Zenodo record)"
                ) from err
            if err.code >= 500 or err.code in _RETRY_STATUSES:
                raise _Retryable(status) from err
            raise DownloadError(
                f"{url}: {status} while downloading {spec.download_name} (expected 200 or 206)"
            ) from err
        except (OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", None) or err
            raise _Retryable(f"cannot connect: {reason}") from err
        with response:
            return self._receive(response, offset)

    def _range_not_satisfiable(self, offset: int) -> str | None:
        digest = md5_file(self.part, self.chunk_size)
        if digest == self.spec.download_md5:
            log.info("%s: part file already complete (%s)", self.part, _fmt_bytes(offset))
            return digest
        log.warning(
            "%s: server says the %s part file is complete but its MD5 is %s, expected %s; "
            "starting again from zero",
            self.url,
            _fmt_bytes(offset),
            digest,
            self.spec.download_md5,
        )
        self.part.unlink()
        return None

    def _read(self, response: http.client.HTTPResponse, done: int, total: int | None) -> bytes:
        try:
            return response.read(self.chunk_size)
        except (OSError, http.client.HTTPException) as err:
            of = f" of {total:,}" if total is not None else ""
            raise _Retryable(f"connection lost after {done:,}{of} bytes: {err!r}") from err

    def _receive(self, response: http.client.HTTPResponse, offset: int) -> str | None:
        part, spec, url = self.part, self.spec, self.url
        status = response.status
        content_type = response.headers.get("Content-Type", "")
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        if status == 206 and offset:
            content_range = response.headers.get("Content-Range", "")
            match = re.match(r"bytes (\d+)-", content_range)
            if not match or int(match.group(1)) != offset:
                raise _Retryable(
                    f"asked for bytes from {offset:,}, server sent range {content_range!r}"
                )
            start = offset
        elif status == 200:
            if offset:
                log.info("%s: server ignored the Range request; starting from zero", url)
            start = 0
        else:
            raise _Retryable(f"unexpected HTTP {status} {response.reason}")
        total = None if length is None else start + length

        head = self._read(response, start, total)
        if "text/html" in content_type.lower():
            raise _html_error(url, spec, content_type, head)
        while start == 0 and 0 < len(head) < 2:
            more = self._read(response, start + len(head), total)
            if not more:
                break
            head += more
        if start == 0 and head:
            if _looks_like_html(head):
                raise _html_error(url, spec, content_type, head)
            if spec.compressed and head[:2] != GZIP_MAGIC:
                raise DownloadError(
                    f"{url}: expected gzip data for {spec.download_name} (first bytes 1f 8b), "
                    f"got {head[:8].hex(' ')} (Content-Type {content_type or 'not given'})"
                )

        digest = hashlib.md5()
        if start:
            with open(part, "rb") as fh:
                while chunk := fh.read(self.chunk_size):
                    digest.update(chunk)
        received = 0
        bar = tqdm(
            total=total,
            initial=start,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=spec.download_name,
            disable=not self.progress,
            leave=False,
        )
        try:
            with bar, open(part, "ab" if start else "wb") as fh:
                data = head
                while data:
                    _write_chunk(fh, data)
                    digest.update(data)
                    received += len(data)
                    bar.update(len(data))
                    data = self._read(response, start + received, total)
        except OSError as err:
            needed = None if length is None else length - received
            raise _write_error(err, part, f"downloading {url} to", needed) from err
        if length is not None and received < length:
            raise _Retryable(f"connection closed after {start + received:,} of {total:,} bytes")
        if start == 0 and not received and spec.compressed:
            raise _Retryable("empty response")
        return digest.hexdigest()


def _fetch(
    url: str,
    part: Path,
    spec: PCamFile,
    *,
    timeout: float,
    retries: int,
    backoff: float,
    progress: bool,
    chunk_size: int,
) -> str:
    """Complete ``part`` from ``url``, retrying transient failures; return its MD5."""
    fetcher = _Fetcher(url, part, spec, timeout=timeout, progress=progress, chunk_size=chunk_size)
    failures = 0
    while True:
        try:
            digest = fetcher.attempt()
        except _Retryable as err:
            failures += 1
            if failures > retries:
                kept = (
                    f"; the {_fmt_bytes(part.stat().st_size)} received so far are kept in "
                    f"{part} and the next run resumes from there"
                    if part.exists() and part.stat().st_size
                    else ""
                )
                raise DownloadError(
                    f"{url}: download of {spec.download_name} failed after {failures} "
                    f"attempt(s); last error: {err}{kept}"
                ) from err
            delay = min(backoff * 2 ** (failures - 1), _MAX_DELAY)
            log.warning("%s: %s; retry %d of %d in %.1f s", url, err, failures, retries, delay)
            time.sleep(delay)
            continue
        if digest is not None:
            return digest


def _decompress(
    part: Path, final: Path, spec: PCamFile, *, progress: bool, chunk_size: int
) -> None:
    """Gunzip ``part`` as a stream to a hidden temporary, verify it, rename it to ``final``."""
    tmp = final.with_name(f".{final.name}.partial")
    digest = hashlib.md5()
    written = 0
    bar = tqdm(
        total=_decompressed_size_hint(part),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"gunzip {spec.name}",
        disable=not progress,
        leave=False,
    )
    try:
        with bar, gzip.open(part, "rb") as src, open(tmp, "wb") as dst:
            while True:
                try:
                    chunk = src.read(chunk_size)
                except (gzip.BadGzipFile, EOFError, zlib.error) as err:
                    tmp.unlink(missing_ok=True)
                    part.unlink(missing_ok=True)
                    raise DownloadError(
                        f"{part}: not a valid gzip file although its MD5 matched "
                        f"{spec.download_md5} ({err}); it was deleted, run again"
                    ) from err
                if not chunk:
                    break
                _write_chunk(dst, chunk)
                digest.update(chunk)
                written += len(chunk)
                bar.update(len(chunk))
            dst.flush()
            os.fsync(dst.fileno())
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno not in _DISK_FULL:
            raise DownloadError(f"cannot write {tmp} while decompressing {part}: {err}") from err
        hint = _decompressed_size_hint(part)
        need = (
            "an unknown amount of"
            if hint is None
            else f"at least {_fmt_bytes(max(hint - written, 0))} more"
        )
        raise DownloadError(
            f"disk full while decompressing {part.name} to {final}: it needs {need} free "
            f"space in {final.parent} (free now: {_free_text(final.parent)}; decompressed "
            f"size about {_fmt_bytes(hint) if hint is not None else 'unknown'}). The partial "
            f"file {tmp.name} was removed; the verified download {part} was kept, so the "
            f"next run only decompresses. Free up space and run again. [{err}]"
        ) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    found = digest.hexdigest()
    if found != spec.md5:
        tmp.unlink(missing_ok=True)
        raise DownloadError(
            f"{final}: MD5 of the decompressed data is {found}, expected {spec.md5} "
            f"(the download {part} matched {spec.download_md5}); nothing was renamed"
        )
    os.replace(tmp, final)
    part.unlink()


def download_file(
    spec: PCamFile,
    dest: str | os.PathLike,
    *,
    url_template: str = ZENODO_URL,
    progress: bool = True,
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 1.0,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download, verify and (for ``.gz``) decompress one file into ``dest``.

    Args:
        spec: The file: names and MD5s.
        dest: Destination directory (created if needed).
        url_template: Address with a ``{filename}`` field, filled with ``spec.download_name``.
        progress: Show tqdm progress bars.
        timeout: Socket timeout in seconds.
        retries: Further attempts after a server error or dropped connection.
        backoff: Seconds before the first retry; doubled for each further one.
        chunk_size: Bytes read and written at a time.

    Returns:
        The path of the verified file ``dest / spec.name``.

    Raises:
        DownloadError: when the file cannot be downloaded or verified; an existing file
            with the wrong checksum is reported, never replaced.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / spec.name
    if final.exists():
        found = md5_file(final, chunk_size)
        if found == spec.md5:
            log.info("%s: already present, checksum ok", final)
            return final
        raise DownloadError(
            f"{final}: already present but its MD5 is {found}, expected {spec.md5} "
            "(corrupt, truncated or another version); it was left untouched: remove it "
            "and run again to download it anew"
        )
    url = url_template.format(filename=spec.download_name)
    part = dest / f"{spec.download_name}.part"
    log.info("%s: downloading from %s", final, url)
    found = _fetch(
        url,
        part,
        spec,
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        progress=progress,
        chunk_size=chunk_size,
    )
    if found != spec.download_md5:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{spec.download_name} from {url}: MD5 is {found}, expected "
            f"{spec.download_md5}; the corrupt download was deleted, run again"
        )
    if spec.compressed:
        _decompress(part, final, spec, progress=progress, chunk_size=chunk_size)
    else:
        if found != spec.md5:
            raise DownloadError(
                f"{spec.name}: MD5 is {found}, expected {spec.md5} (the files table gives "
                f"two different MD5s for an uncompressed file); kept as {part}"
            )
        os.replace(part, final)
    log.info("%s: downloaded, checksum ok", final)
    return final


def download_pcam(
    dest: str | os.PathLike,
    splits: Iterable[str] = SPLITS,
    kinds: Iterable[str] = KINDS,
    *,
    files: Mapping[tuple[str, str], PCamFile] | None = None,
    url_template: str = ZENODO_URL,
    progress: bool = True,
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 1.0,
    chunk_size: int = 1 << 20,
) -> list[Path]:
    """Download the official PCam files (Zenodo record 2546921) into ``dest``.

    Files already present with the right checksum are skipped; interrupted downloads
    resume from their ``.part`` file. See :func:`download_file` for what happens to each.

    Args:
        dest: Destination directory (created if needed).
        splits: Splits to fetch (``train``, ``valid``, ``test``).
        kinds: Parts of each split: ``x`` (images), ``y`` (labels), ``meta`` (CSV).
        files: Table of files keyed by ``(split, kind)``; defaults to
            :data:`pcamlib.pcam.PCAM_FILES`.
        url_template: Address with a ``{filename}`` field for the name on the server.
        progress: Show tqdm progress bars.
        timeout: Socket timeout in seconds.
        retries: Further attempts per file after a server error or dropped connection.
        backoff: Seconds before the first retry; doubled for each further one.
        chunk_size: Bytes read and written at a time (bounds memory).

    Returns:
        The final paths, in the order of ``splits`` then ``kinds``.

    Raises:
        ValueError: for an unknown split or kind, or one missing from ``files``.
        DownloadError: when a file cannot be downloaded or verified.
    """
    table = PCAM_FILES if files is None else files
    splits, kinds = list(splits), list(kinds)
    for split in splits:
        check_split(split)
    for kind in kinds:
        if kind not in KINDS:
            raise InputError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    keys = [(split, kind) for split in splits for kind in kinds]
    missing = [key for key in keys if key not in table]
    if missing:
        raise InputError(f"no entry for {missing} in the files table")
    if "{filename}" not in url_template:
        raise InputError(f"url_template must contain '{{filename}}', got {url_template!r}")
    return [
        download_file(
            table[key],
            dest,
            url_template=url_template,
            progress=progress,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            chunk_size=chunk_size,
        )
        for key in keys
    ]
