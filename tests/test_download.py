"""download_pcam against a real local HTTP server serving tiny gzipped PCam files."""

from __future__ import annotations

import errno
import gzip
import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pandas as pd
import pytest

from pcamlib import download
from pcamlib.download import DownloadError, download_pcam
from pcamlib.pcam import PCamFile, PCamWriter, file_name, validate_split

SPLIT_ROWS = {"train": 3, "valid": 2}
CHUNK = 4096  # small, so every file takes many reads and writes


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@dataclass
class Fixtures:
    raw: dict[str, bytes]  # final name -> decompressed content
    served: dict[str, bytes]  # download name -> content on the server
    files: dict[tuple[str, str], PCamFile]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Fixtures:
    root = tmp_path_factory.mktemp("pcam-src")
    rng = np.random.default_rng(0)
    for split, n in SPLIT_ROWS.items():
        with PCamWriter(root, split, n, meta=True) as writer:
            writer.write(
                rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8),  # incompressible
                rng.integers(0, 2, n),
                pd.DataFrame({"coord_y": range(n), "coord_x": range(n), "wsi": ["w"] * n}),
            )
    raw, served, files = {}, {}, {}
    for split in SPLIT_ROWS:
        for kind in ("x", "y", "meta"):
            name = file_name(split, kind)
            data = (root / name).read_bytes()
            raw[name] = data
            if kind == "meta":
                download_name, payload = name, data
            else:
                download_name, payload = name + ".gz", gzip.compress(data, mtime=0)
            served[download_name] = payload
            files[split, kind] = PCamFile(name, download_name, md5(payload), md5(data))
    return Fixtures(raw, served, files)


@dataclass
class ServerState:
    files: dict[str, bytes]
    html: str | None = None  # "header": text/html page; "body": '<' body, binary type
    fail_status: int | None = None
    fail_times: int | None = 0  # None: forever
    drop_after: int | None = None  # bytes sent on the first request before hanging up
    ignore_range: bool = False
    requests: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, format, *args):  # noqa: A002 - silence the access log
        pass

    def do_GET(self):  # noqa: N802 - http.server's name
        st: ServerState = self.server.state
        name = unquote(urlsplit(self.path).path.lstrip("/"))
        rng = self.headers.get("Range")
        with st.lock:
            st.requests.append({"name": name, "range": rng})
            first = sum(r["name"] == name for r in st.requests) == 1
            fail = st.fail_status is not None and (st.fail_times is None or st.fail_times > 0)
            if fail and st.fail_times is not None:
                st.fail_times -= 1
        if fail:
            self.send_error(st.fail_status)
            return
        if name not in st.files:
            self.send_error(404)
            return
        if st.html:
            body = b"<!DOCTYPE html>\n<html><body>Zenodo is down for maintenance</body></html>"
            self.send_response(200)
            ctype = "text/html; charset=utf-8" if st.html == "header" else "application/gzip"
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        data = st.files[name]
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if match and not st.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if st.drop_after is not None and first:
            body = body[: st.drop_after]  # then the connection closes (HTTP/1.0)
        self.wfile.write(body)


@dataclass
class Server:
    state: ServerState
    url_template: str

    def names(self) -> list[str]:
        return [r["name"] for r in self.state.requests]


@pytest.fixture
def server(fixtures):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = ServerState(files=dict(fixtures.served))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    port = httpd.server_address[1]
    yield Server(httpd.state, f"http://127.0.0.1:{port}/{{filename}}")
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def fetch(dest, server, fixtures, splits=("valid",), kinds=("x", "y", "meta"), **kw):
    options = dict(
        files=fixtures.files,
        url_template=server.url_template,
        progress=False,
        timeout=10.0,
        retries=3,
        backoff=0.0,
        chunk_size=CHUNK,
    )
    options.update(kw)
    return download_pcam(dest, splits, kinds, **options)


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.name.endswith((".part", ".partial")))


def url_of(server, name: str) -> str:
    return server.url_template.format(filename=name)


X = file_name("valid", "x")
X_GZ = X + ".gz"


def test_happy_path_two_splits(tmp_path, server, fixtures):
    dest = tmp_path / "pcam"
    paths = fetch(dest, server, fixtures, splits=("train", "valid"), progress=True)
    assert [p.name for p in paths] == [
        file_name(s, k) for s in ("train", "valid") for k in ("x", "y", "meta")
    ]
    for path in paths:
        assert path.read_bytes() == fixtures.raw[path.name]
    for split, n in SPLIT_ROWS.items():
        assert validate_split(dest, split).length == n
    assert leftovers(dest) == []
    assert all(r["range"] is None for r in server.state.requests)


def test_skip_when_present_with_good_md5(tmp_path, server, fixtures, caplog):
    (tmp_path / X).write_bytes(fixtures.raw[X])
    with caplog.at_level("INFO", logger="pcamlib.download"):
        paths = fetch(tmp_path, server, fixtures)
    assert "already present, checksum ok" in caplog.text
    assert X_GZ not in server.names()
    assert len(server.names()) == 2  # y and meta only
    assert validate_split(tmp_path, "valid").length == 2
    assert paths[0] == tmp_path / X


def test_existing_file_with_bad_md5_is_reported_and_untouched(tmp_path, server, fixtures):
    user = tmp_path / X
    user.write_bytes(b"my own data")
    with pytest.raises(DownloadError) as info:
        fetch(tmp_path, server, fixtures, kinds=("x",))
    msg = str(info.value)
    assert X in msg and "remove it" in msg
    assert md5(b"my own data") in msg and fixtures.files["valid", "x"].md5 in msg
    assert user.read_bytes() == b"my own data"
    assert server.names() == []


def test_resume_after_dropped_connection(tmp_path, server, fixtures):
    cut = 10_000
    assert len(fixtures.served[X_GZ]) > 3 * cut
    server.state.drop_after = cut
    fetch(tmp_path, server, fixtures, kinds=("x",), retries=1)
    reqs = [r for r in server.state.requests if r["name"] == X_GZ]
    assert [r["range"] for r in reqs] == [None, f"bytes={cut}-"]
    assert (tmp_path / X).read_bytes() == fixtures.raw[X]
    assert leftovers(tmp_path) == []


def test_dropped_connection_without_retries_keeps_part_for_next_run(tmp_path, server, fixtures):
    cut = 5_000
    server.state.drop_after = cut
    with pytest.raises(DownloadError) as info:
        fetch(tmp_path, server, fixtures, kinds=("x",), retries=0)
    msg = str(info.value)
    assert url_of(server, X_GZ) in msg and "connection closed" in msg
    assert f"{cut:,} of {len(fixtures.served[X_GZ]):,} bytes" in msg
    assert (tmp_path / (X_GZ + ".part")).stat().st_size == cut
    assert not (tmp_path / X).exists()
    fetch(tmp_path, server, fixtures, kinds=("x",), retries=0)
    assert server.state.requests[-1]["range"] == f"bytes={cut}-"
    assert (tmp_path / X).read_bytes() == fixtures.raw[X]
    assert leftovers(tmp_path) == []


def test_server_ignoring_range_restarts_from_zero(tmp_path, server, fixtures):
    server.state.ignore_range = True
    (tmp_path / (X_GZ + ".part")).write_bytes(b"\x1f\x8b" + b"stale bytes" * 100)
    fetch(tmp_path, server, fixtures, kinds=("x",))
    assert server.state.requests[0]["range"] == f"bytes={2 + 1100}-"
    assert (tmp_path / X).read_bytes() == fixtures.raw[X]
    assert leftovers(tmp_path) == []


def test_complete_part_file_is_verified_on_416(tmp_path, server, fixtures):
    payload = fixtures.served[X_GZ]
    (tmp_path / (X_GZ + ".part")).write_bytes(payload)
    fetch(tmp_path, server, fixtures, kinds=("x",))
    assert server.state.requests == [{"name": X_GZ, "range": f"bytes={len(payload)}-"}]
    assert (tmp_path / X).read_bytes() == fixtures.raw[X]
    assert leftovers(tmp_path) == []


def test_bogus_part_file_on_416_restarts(tmp_path, server, fixtures):
    payload = fixtures.served[X_GZ]
    (tmp_path / (X_GZ + ".part")).write_bytes(b"\x1f\x8b" + bytes(len(payload)))
    fetch(tmp_path, server, fixtures, kinds=("x",), retries=0)
    assert [r["range"] for r in server.state.requests] == [f"bytes={len(payload) + 2}-", None]
    assert (tmp_path / X).read_bytes() == fixtures.raw[X]


@pytest.mark.parametrize("how", ["header", "body"])
def test_html_page_instead_of_gzip(tmp_path, server, fixtures, how):
    server.state.html = how
    with pytest.raises(DownloadError) as info:
        fetch(tmp_path, server, fixtures, kinds=("x",))
    msg = str(info.value)
    assert "HTML page" in msg and "instead of gzip" in msg
    assert url_of(server, X_GZ) in msg
    assert "<!DOCTYPE html>" in msg
    assert list(tmp_path.iterdir()) == []
    assert len(server.names()) == 1  # not retried


def test_html_page_instead_of_csv(tmp_path, server, fixtures):
    server.state.html = "header"
    with pytest.raises(DownloadError, match="HTML page instead of a CSV"):
        fetch(tmp_path, server, fixtures, kinds=("meta",))
    assert list(tmp_path.iterdir()) == []


def test_checksum_mismatch(tmp_path, server, fixtures):
    wrong = "0" * 32
    good = fixtures.files["valid", "x"]
    files = dict(fixtures.files)
    files["valid", "x"] = PCamFile(good.name, good.download_name, wrong, good.md5)
    with pytest.raises(DownloadError) as info:
        fetch(tmp_path, server, fixtures, kinds=("x",), files=files)
    msg = str(info.value)
    assert wrong in msg and good.download_md5 in msg and X_GZ in msg
    assert list(tmp_path.iterdir()) == []


def test_decompressed_checksum_mismatch(tmp_path, server, fixtures):
    good = fixtures.files["valid", "x"]
    files = dict(fixtures.files)
    files["valid", "x"] = PCamFile(good.name, good.download_name, good.download_md5, "1" * 32)
    with pytest.raises(DownloadError) as info:
        fetch(tmp_path, server, fixtures, kinds=("x",), files=files)
    msg = str(info.value)
    assert "1" * 32 in msg and good.md5 in msg and X in msg
    assert not (tmp_path / X).exists()
    assert leftovers(tmp_path) == [X_GZ + ".part"]


def test_server_error_then_success(tmp_path, server, fixtures):
    server.state.fail_status, server.state.fail_times = 500, 2
    fetch(tmp_path, server, fixtures, kinds=("x",), retries=2)
    assert server.names() == [X_GZ] * 3
    assert (tmp_path / X).read_bytes() == fixtures.raw[X]


def test_server_error_forever(tmp_path, server, fixtures):
    server.state.fail_status, server.state.fail_times = 503, None
    with pytest.raises(DownloadError) as info:
        fetch(tmp_path, server, fixtures, kinds=("x",), retries=2)
    msg = str(info.value)
    assert url_of(server, X_GZ) in msg and "HTTP 503" in msg and "3 attempt" in msg
    assert server.names() == [X_GZ] * 3
    assert list(tmp_path.iterdir()) == []


def test_not_found_fails_at_once(tmp_path, server, fixtures):
    del server.state.files[X_GZ]
    with pytest.raises(DownloadError) as info:
        fetch(tmp_path, server, fixtures, kinds=("x",), retries=5, backoff=30.0)
    msg = str(info.value)
    assert url_of(server, X_GZ) in msg and "404" in msg and "does not exist" in msg
    assert server.names() == [X_GZ]
    assert list(tmp_path.iterdir()) == []


def _disk_full_on(monkeypatch, suffix: str) -> None:
    real = download._write_chunk
    calls = {"n": 0}

    def write(fh, data):
        if str(fh.name).endswith(suffix):
            calls["n"] += 1
            if calls["n"] > 2:  # let something be half-written first
                raise OSError(errno.ENOSPC, "No space left on device")
        real(fh, data)

    monkeypatch.setattr(download, "_write_chunk", write)


def test_disk_full_while_decompressing(tmp_path, server, fixtures, monkeypatch):
    _disk_full_on(monkeypatch, ".partial")
    with pytest.raises(DownloadError) as info:
        fetch(tmp_path, server, fixtures, kinds=("x",))
    msg = str(info.value)
    assert "disk full" in msg and str(tmp_path / X) in msg
    needed = len(fixtures.raw[X]) - 2 * CHUNK
    assert f"at least {download._fmt_bytes(needed)} more" in msg
    assert not (tmp_path / X).exists()
    assert leftovers(tmp_path) == [X_GZ + ".part"]  # kept: the next run only decompresses
    monkeypatch.undo()
    fetch(tmp_path, server, fixtures, kinds=("x",))
    assert server.state.requests[-1]["range"] == f"bytes={len(fixtures.served[X_GZ])}-"
    assert (tmp_path / X).read_bytes() == fixtures.raw[X]
    assert leftovers(tmp_path) == []


def test_disk_full_while_downloading(tmp_path, server, fixtures, monkeypatch):
    _disk_full_on(monkeypatch, ".part")
    with pytest.raises(DownloadError) as info:
        fetch(tmp_path, server, fixtures, kinds=("x",))
    msg = str(info.value)
    part = tmp_path / (X_GZ + ".part")
    assert "disk full" in msg and str(part) in msg and url_of(server, X_GZ) in msg
    assert "next run resumes" in msg
    needed = len(fixtures.served[X_GZ]) - 2 * CHUNK
    assert f"at least {download._fmt_bytes(needed)} more" in msg
    assert not (tmp_path / X).exists()
    assert part.stat().st_size == 2 * CHUNK  # kept for a resume
    assert len(server.names()) == 1  # a full disk is not retried


def test_unknown_kind_and_missing_entry(tmp_path, fixtures):
    with pytest.raises(ValueError, match="kind must be one of"):
        download_pcam(tmp_path, ["valid"], ["z"], files=fixtures.files, progress=False)
    with pytest.raises(ValueError, match="split must be one of"):
        download_pcam(tmp_path, ["dev"], files=fixtures.files, progress=False)
    with pytest.raises(ValueError, match="no entry"):
        download_pcam(tmp_path, ["test"], files=fixtures.files, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_decompressed_size_hint(tmp_path):
    data = bytes(range(256)) * 300
    path = tmp_path / "f.gz"
    path.write_bytes(gzip.compress(data))
    assert download._decompressed_size_hint(path) == len(data)


def test_defaults_are_the_official_record():
    defaults = download_pcam.__kwdefaults__
    assert defaults["url_template"].startswith("https://zenodo.org/records/2546921/files/")
    assert defaults["files"] is None  # meaning pcam.PCAM_FILES
