"""Fetching public data: from a mirror served over HTTP on loopback, checked by sha256,
resumed after an interruption, and one clear message without any source."""

import hashlib
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from steamviz import fetch

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` ({path: bytes}); honours Range; can cut a response short."""

    def do_GET(self):  # noqa: N802
        srv = self.server
        srv.seen.append((self.path, self.headers.get("Range")))
        body = srv.files.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and srv.ranges:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        chunk = body[start:]
        if srv.cut_after is not None:  # the connection drops mid-way, once
            self.wfile.write(chunk[: srv.cut_after])
            self.wfile.flush()
            srv.cut_after = None
            self.close_connection = True
            return
        self.wfile.write(chunk)

    def log_message(self, *a):
        pass


@pytest.fixture()
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.seen, srv.cut_after, srv.ranges = {}, [], None, True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture()
def one_file(monkeypatch, tmp_path):
    """A data set 'toy' of one 1 MiB file, with the cache in tmp_path."""
    f = fetch.File(path="toy/blob.bin", size=len(PAYLOAD),
                   sha256=hashlib.sha256(PAYLOAD).hexdigest(), url=None)
    monkeypatch.setattr(fetch, "sources", lambda: {"toy": dict(description="toy", license="-",
                                                               files=[f])})
    monkeypatch.setenv("STEAMVIZ_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(fetch.MIRROR_ENV, raising=False)
    return f


def _mirror(monkeypatch, srv):
    monkeypatch.setenv(fetch.MIRROR_ENV, f"http://127.0.0.1:{srv.server_address[1]}/m")


def test_fetch_from_an_http_mirror_checks_and_caches(server, one_file, monkeypatch):
    server.files["m/toy/blob.bin"] = PAYLOAD
    _mirror(monkeypatch, server)
    root = fetch.get("toy")
    assert (root / "toy/blob.bin").read_bytes() == PAYLOAD
    assert fetch.status("toy") == "cached" and fetch.available("toy") is None
    n = len(server.seen)
    fetch.get("toy")  # verified in the cache: no request
    assert len(server.seen) == n
    assert not list((root / "toy").glob("*.part"))


def test_a_checksum_mismatch_is_refused_and_deleted(server, one_file, monkeypatch):
    server.files["m/toy/blob.bin"] = PAYLOAD[:-1] + b"X"
    _mirror(monkeypatch, server)
    with pytest.raises(fetch.ChecksumError, match="expected .*refused and deleted"):
        fetch.get("toy")
    root = fetch.data_root()
    assert not (root / "toy/blob.bin").exists() and not list((root / "toy").glob("*.part"))


def test_an_interrupted_download_resumes_where_it_stopped(server, one_file, monkeypatch):
    server.files["m/toy/blob.bin"] = PAYLOAD
    server.cut_after = 300_000
    _mirror(monkeypatch, server)
    with pytest.raises(fetch.DataError):
        fetch.get("toy", timeout=5)
    part = fetch.data_root() / "toy/blob.bin.part"
    assert part.stat().st_size == 300_000 and not (fetch.data_root() / "toy/blob.bin").exists()
    fetch.get("toy", timeout=5)
    assert (fetch.data_root() / "toy/blob.bin").read_bytes() == PAYLOAD
    assert server.seen[-1][1] == "bytes=300000-"  # only the rest was asked for


def test_no_source_gives_one_message_naming_the_mirror_variable(one_file, monkeypatch):
    # a public URL that cannot be reached (nothing listens on this port) and no mirror
    f = fetch.File(path="toy/blob.bin", size=len(PAYLOAD), sha256=one_file.sha256,
                   url="http://127.0.0.1:9/blob.bin")
    monkeypatch.setattr(fetch, "sources", lambda: {"toy": dict(description="toy", license="-",
                                                               files=[f])})
    with pytest.raises(fetch.DataError, match=r"could not fetch toy/blob.bin: public URL .*"
                                              r"Without internet, set STEAMVIZ_DATA_MIRROR"):
        fetch.get("toy", timeout=5)
    # loading never downloads: it names the command to run
    with pytest.raises(fetch.DataError, match=r"steamviz data get toy"):
        fetch.path("toy")


def test_loading_copies_from_a_mirror_folder_and_checks_it(one_file, monkeypatch, tmp_path):
    m = tmp_path / "mirror"
    (m / "toy").mkdir(parents=True)
    (m / "toy/blob.bin").write_bytes(PAYLOAD)
    monkeypatch.setenv(fetch.MIRROR_ENV, str(m))
    assert fetch.status("toy") == "in mirror"
    p = fetch.path("toy", "toy/blob.bin")
    assert p.read_bytes() == PAYLOAD and p.parent.parent == fetch.data_root()


def test_the_manifest_covers_the_public_sets_with_checksums():
    src = fetch.sources()
    assert {"counterfact", "mquake", "zsre", "lre", "pararel", "polyglot", "wikitext"} <= set(src)
    for name, s in src.items():
        assert s["files"], name
        for f in s["files"]:
            assert len(f.sha256) == 64 and f.size > 0
            assert f.url is None or f.url.startswith("https://raw.githubusercontent.com/")
    # every file the project loads by name has a public URL
    cf = {f.path: f for f in src["counterfact"]["files"]}
    assert cf["counterfact_easyedit/counterfact-val.json"].url


def test_the_manifest_matches_the_mirror_when_present():
    """Each file of the manifest that the mirror holds has the manifest's size and sha256."""
    from conftest import data_missing

    if data_missing("counterfact"):
        pytest.skip("no data mirror here")
    root = Path(fetch.mirror()) if fetch.mirror() else None
    if root is None:
        pytest.skip("no data mirror folder set")
    for s in fetch.sources().values():
        for f in s["files"]:
            p = root / f.path
            if p.is_file():
                assert p.stat().st_size == f.size, f.path
                assert hashlib.sha256(p.read_bytes()).hexdigest() == f.sha256, f.path


def test_data_cli_lists_and_refuses_unknown_names(tmp_path):
    env = {"STEAMVIZ_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "steamviz", "data", "list"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "counterfact" in out.stdout and "not fetched" in out.stdout
    out = subprocess.run([sys.executable, "-m", "steamviz", "data", "get", "nosuch"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown data set 'nosuch'" in out.stderr
    assert "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "steamviz", "--version"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("steamviz ")
    json.dumps(fetch.table())  # the listing is plain data


def test_named_data_reads_through_the_fetch_layer(tmp_path, monkeypatch):
    from steamviz.data.datasets import load_named

    monkeypatch.setenv("STEAMVIZ_CACHE", str(tmp_path / "empty"))
    mirror = fetch.mirror()
    monkeypatch.delenv(fetch.MIRROR_ENV, raising=False)
    with pytest.raises(fetch.DataError, match="steamviz data get counterfact"):
        load_named("counterfact", 2)
    if not mirror or not Path(mirror, "counterfact_easyedit").is_dir():
        pytest.skip("no data mirror folder here")
    monkeypatch.setenv(fetch.MIRROR_ENV, mirror)
    reqs = load_named("counterfact", 2)
    assert len(reqs) == 2 and reqs[0].target_new
    assert (tmp_path / "empty/data/counterfact_easyedit/counterfact-val.json").is_file()


def test_doctor_reports_each_check_with_its_fix(tmp_path):
    env = {"STEAMVIZ_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "steamviz", "doctor"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert "data: counterfact" in out.stdout and "fix: steamviz data get counterfact" in out.stdout
    for what in ("default model", "data mirror", "chromium", "torch", "transformers"):
        assert what in out.stdout
    assert out.returncode in (0, 1) and "Traceback" not in out.stderr


QUOTED = b'""\n" = Title = \n"\n"A line , with ""quotes"" and an \xc3\xa9 .\n"\n'
PLAIN = ' = Title = \nA line , with "quotes" and an \u00e9 .\n'.encode()


def _toy_set(monkeypatch, tmp_path, files):
    monkeypatch.setattr(fetch, "sources", lambda: {"toy": dict(description="toy", license="-",
                                                               files=files)})
    monkeypatch.setenv("STEAMVIZ_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(fetch.MIRROR_ENV, raising=False)


def _file(path, body, url=None, derived=None):
    return fetch.File(path=path, size=len(body), sha256=hashlib.sha256(body).hexdigest(),
                      url=url, derived=derived)


def test_a_conversion_is_made_from_its_published_file_without_the_mirror(server, monkeypatch,
                                                                         tmp_path):
    port = server.server_address[1]
    server.files["pub/valid.tokens"] = QUOTED
    src = _file("toy/valid.tokens", QUOTED, url=f"http://127.0.0.1:{port}/pub/valid.tokens")
    made = _file("toy/valid.clean.txt", PLAIN,
                 derived={"from": "toy/valid.tokens", "how": "csv-text"})
    _toy_set(monkeypatch, tmp_path, [made, src])
    root = fetch.get("toy")  # the converted file first: its published file is fetched for it
    assert (root / "toy/valid.clean.txt").read_bytes() == PLAIN
    assert fetch.status("toy") == "cached" and fetch.available("toy") is None
    assert [p for p, _ in server.seen] == ["/pub/valid.tokens"]
    # loading makes it too, from a published file already here (no network)
    (root / "toy/valid.clean.txt").unlink()
    assert fetch.path("toy", "toy/valid.clean.txt").read_bytes() == PLAIN
    assert len(server.seen) == 1
    # a conversion that does not give the listed bytes is refused, nothing left behind
    bad = _file("toy/valid.clean.txt", PLAIN + b"x",
                derived={"from": "toy/valid.tokens", "how": "csv-text"})
    _toy_set(monkeypatch, tmp_path, [bad, src])
    (root / "toy/valid.clean.txt").unlink()
    with pytest.raises(fetch.ChecksumError, match="made from toy/valid.tokens .*expected"):
        fetch.path("toy", "toy/valid.clean.txt")
    assert not (root / "toy/valid.clean.txt").exists()
    assert not (root / "toy/valid.clean.txt.part").exists()


def test_get_fetches_what_is_public_then_names_the_mirror_only_files(server, monkeypatch,
                                                                     tmp_path):
    port = server.server_address[1]
    server.files["pub/templates.json"] = b"{}"
    pub = _file("toy/templates.json", b"{}", url=f"http://127.0.0.1:{port}/pub/templates.json")
    half = _file("toy/a-fixed-half.json", b"[1]")
    _toy_set(monkeypatch, tmp_path, [half, pub])
    full = dict(description="-", license="-", files=[])
    monkeypatch.setattr(fetch, "sources", lambda: {
        "toy": dict(description="toy", license="-", files=[half, pub]), "toy-full": full})
    with pytest.raises(fetch.DataError, match=r"toy/a-fixed-half.json exist\(s\) only in the "
                       r"steamviz data mirror .*set STEAMVIZ_DATA_MIRROR.*steamviz data get toy-full"):
        fetch.get("toy")
    assert (fetch.data_root() / "toy/templates.json").read_bytes() == b"{}"
    assert fetch.table()[0]["mirror_only"] == 1


@pytest.mark.parametrize("name", ["wikitext", "polyglot"])
def test_the_mirrors_conversions_are_made_byte_for_byte_from_the_published_files(name):
    """Every ``derived`` file of the manifest: the conversion of the mirror's published file
    has the manifest's sha256 (so a machine without the mirror makes the same file)."""
    from steamviz.data.corpus import convert

    m = fetch.mirror()
    if not m or fetch._is_url(m):
        pytest.skip("no data mirror folder here")
    made = [f for f in fetch.sources()[name]["files"] if f.derived]
    assert made, f"{name} lists no converted file"
    for f in made:
        src = Path(m) / f.derived["from"]
        if not src.is_file():
            pytest.skip(f"{src} not in the mirror")
        assert hashlib.sha256(convert(f.derived["how"], src)).hexdigest() == f.sha256, f.path
