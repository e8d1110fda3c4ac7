"""`sun-seg download` against a local HTTP server (127.0.0.1, a thread): resuming after dropped connections,
checksum and size mismatches, safe unpacking, and the whole chain download -> unpack -> prepare in both forms."""
import dataclasses
import hashlib
import io
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from sun_seg.core import DataError
from sun_seg.data.download import ARCHIVES, URL_ENV, download, extract, fetch
from sun_seg.data.formats import detect_form, write_official_release, write_preprocessed_release
from sun_seg.data.sunrgbd import SunRGBD

from data_fixtures import make_frames


class Mirror(BaseHTTPRequestHandler):
    """Serves `files` by name with Range support; `faults[name]` is a list of per-request behaviours:
    an int cuts the body after that many bytes (a dropped connection), 'ignore-range' answers 200 with everything."""
    files: dict = {}
    faults: dict = {}
    log: list = []

    def log_message(self, *args): pass

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        rng = self.headers.get("Range")
        self.log.append((name, rng))
        if name not in self.files:
            return self.send_error(404)
        data = self.files[name]
        fault = self.faults.get(name, []).pop(0) if self.faults.get(name) else None
        start = int(rng.split("=")[1].split("-")[0]) if rng and fault != "ignore-range" else 0
        if start >= len(data) and start:
            self.send_response(416); self.send_header("Content-Range", f"bytes */{len(data)}"); self.end_headers(); return
        self.send_response(206 if start else 200)
        if start: self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if isinstance(fault, int):
            body = body[:fault]
            self.wfile.write(body); self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def mirror():
    Mirror.files, Mirror.faults, Mirror.log = {}, {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Mirror)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/mirror"
    server.shutdown()
    server.server_close()


PAYLOAD = np.random.default_rng(0).bytes(1_000_003)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


# ---------------------------------------------------------------- fetch
def test_resume_after_dropped_connections(tmp_path, mirror):
    Mirror.files["big.bin"] = PAYLOAD
    Mirror.faults["big.bin"] = [300_000, 200_000]  # two drops, then the rest
    got = fetch(f"{mirror}/big.bin", tmp_path / "big.bin", size=len(PAYLOAD), sha256=SHA, backoff=0, progress=False)
    assert got.read_bytes() == PAYLOAD
    assert Mirror.log == [("big.bin", None), ("big.bin", "bytes=300000-"), ("big.bin", "bytes=500000-")]
    assert not (tmp_path / "big.bin.part").exists()
    Mirror.log.clear()
    fetch(f"{mirror}/big.bin", tmp_path / "big.bin", size=len(PAYLOAD), sha256=SHA, progress=False)
    assert Mirror.log == []  # verified before: neither downloaded nor re-hashed


def test_resume_across_runs(tmp_path, mirror):
    Mirror.files["big.bin"] = PAYLOAD
    Mirror.faults["big.bin"] = [400_000, 10, 10]
    with pytest.raises(DataError, match=r"failed 3 times.*big.bin.part keeps what arrived: run the same command again"):
        fetch(f"{mirror}/big.bin", tmp_path / "big.bin", sha256=SHA, retries=2, backoff=0, progress=False)
    assert (tmp_path / "big.bin.part").stat().st_size == 400_020
    got = fetch(f"{mirror}/big.bin", tmp_path / "big.bin", sha256=SHA, backoff=0, progress=False)
    assert got.read_bytes() == PAYLOAD and Mirror.log[-1] == ("big.bin", "bytes=400020-")


def test_server_ignoring_range_restarts_cleanly(tmp_path, mirror):
    Mirror.files["big.bin"] = PAYLOAD
    Mirror.faults["big.bin"] = [250_000, "ignore-range"]
    got = fetch(f"{mirror}/big.bin", tmp_path / "big.bin", sha256=SHA, backoff=0, progress=False)
    assert got.read_bytes() == PAYLOAD


def test_complete_part_file_is_finished_not_refetched(tmp_path, mirror):
    Mirror.files["big.bin"] = PAYLOAD
    (tmp_path / "big.bin.part").write_bytes(PAYLOAD)  # killed just before the rename
    got = fetch(f"{mirror}/big.bin", tmp_path / "big.bin", sha256=SHA, progress=False)
    assert got.read_bytes() == PAYLOAD and Mirror.log == [("big.bin", f"bytes={len(PAYLOAD)}-")]


@pytest.mark.parametrize("check, words", [
    (dict(sha256="ab" * 32), "sha256 "), (dict(md5="cd" * 16), "md5 "), (dict(size=10), "size 1,000,003 bytes, expected 10")])
def test_mismatch_is_an_error_and_deleted(tmp_path, mirror, check, words):
    Mirror.files["big.bin"] = PAYLOAD
    with pytest.raises(DataError) as e:
        fetch(f"{mirror}/big.bin", tmp_path / "big.bin", progress=False, **check)
    assert "big.bin: the download from" in str(e.value) and words in str(e.value) and "was deleted" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_http_error_names_the_url(tmp_path, mirror):
    with pytest.raises(DataError, match="answered 404.*mirror/absent.zip"):
        fetch(f"{mirror}/absent.zip", tmp_path / "absent.zip", progress=False)


# ---------------------------------------------------------------- extract
def _tar(path, members):
    with tarfile.open(path, "w:gz") as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name, data=b"x"):
    info = tarfile.TarInfo(name); info.size = len(data)
    return info, data


@pytest.mark.parametrize("member", ["../escape.txt", "/abs/escape.txt", "ok/../../escape.txt", "link"])
def test_unsafe_archives_are_refused(tmp_path, member):
    dest = tmp_path / "dest"
    if member == "link":
        info = tarfile.TarInfo("SUNRGBD/link"); info.type = tarfile.SYMTYPE; info.linkname = "/etc/passwd"
        archive = _tar(tmp_path / "a.tgz", [_file("SUNRGBD/ok.txt"), (info, None)])
    else:
        archive = _tar(tmp_path / "a.tgz", [_file("SUNRGBD/ok.txt"), _file(member)])
    with pytest.raises(DataError, match="unsafe member"):
        extract(archive, dest, "SUNRGBD", progress=False)
    assert not (tmp_path / "escape.txt").exists() and not dest.exists()
    zipped = tmp_path / "a.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("SUNRGBD/ok.txt", "x"); z.writestr(zipfile.ZipInfo("../escape.txt"), "x")
    with pytest.raises(DataError, match="unsafe member '../escape.txt'"):
        extract(zipped, dest, "SUNRGBD", progress=False)


def test_extract_is_complete_or_absent(tmp_path):
    archive = _tar(tmp_path / "a.tgz", [_file("img-000001.png", b"1"), _file("img-000002.png", b"2")])
    dest = tmp_path / "dest"
    extract(archive, dest, "labels", progress=False)  # bare members are put into the expected folder
    assert sorted(p.name for p in (dest / "labels").iterdir()) == ["img-000001.png", "img-000002.png"]
    assert [p.name for p in dest.iterdir() if p.name.startswith(".") and p.name.endswith(".extracting")] == []
    (tmp_path / "junk.tgz").write_bytes(b"definitely not an archive")
    with pytest.raises(DataError, match="junk.tgz: is neither a zip nor a tar archive"):
        extract(tmp_path / "junk.tgz", dest, progress=False)


# ---------------------------------------------------------------- the whole chain
def frames(n, start):
    return make_frames(n, start, size=(8, 10))


def zip_folder(folder, arcroot):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file(): z.write(p, f"{arcroot}/{p.relative_to(folder)}")
    return buf.getvalue()


def test_download_official_unpack_prepare(tmp_path, mirror, capsys):
    release = write_official_release(tmp_path / "release", frames(5, 100), frames(3, 0))
    Mirror.files["SUNRGBD.zip"] = zip_folder(release / "SUNRGBD", "SUNRGBD")
    Mirror.files["SUNRGBDtoolbox.zip"] = zip_folder(release / "SUNRGBDtoolbox", "SUNRGBDtoolbox")
    Mirror.faults["SUNRGBD.zip"] = [len(Mirror.files["SUNRGBD.zip"]) // 3]
    # the published MD5 of the real toolbox is checked: this mirror's toolbox is not the real one
    with pytest.raises(DataError, match="SUNRGBDtoolbox.zip: the download from .* does not match: md5"):
        download(tmp_path / "data", "official", base_url=mirror, backoff=0, progress=False)
    archives = tuple(dataclasses.replace(a, md5=hashlib.md5(Mirror.files[a.name]).hexdigest()) for a in ARCHIVES["official"])
    root = download(tmp_path / "data", "official", archives=archives, base_url=mirror, prepare_out=tmp_path / "cache",
                    workers=0, backoff=0, progress=False)
    assert detect_form(root) == "official" and detect_form(tmp_path / "cache") == "cache"
    for split in ("train", "test"):
        a, b = SunRGBD(release, split), SunRGBD(tmp_path / "cache", split)
        assert a.ids == b.ids
        assert all(np.array_equal(a[i]["target"], b[i]["target"]) for i in range(len(a)))
    assert ("SUNRGBD.zip", None) in Mirror.log and any(n == "SUNRGBD.zip" and r for n, r in Mirror.log)  # resumed
    Mirror.log.clear()
    download(tmp_path / "data", "official", archives=archives, base_url=mirror, progress=False)
    assert Mirror.log == []  # everything verified and unpacked: nothing is fetched again


def test_download_preprocessed_cli_env_url(tmp_path, mirror, monkeypatch, capsys):
    release = write_preprocessed_release(tmp_path / "release", frames(4, 100), frames(3, 0))
    for a in ARCHIVES["preprocessed"]:
        if a.folder:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:gz") as t: t.add(release / a.folder, arcname=a.folder)
            Mirror.files[a.name] = buf.getvalue()
        else:
            Mirror.files[a.name] = (release / a.name).read_bytes()
    monkeypatch.setenv(URL_ENV, mirror)
    # the two image lists have a known size and SHA-256: a mirror with other lists is refused
    with pytest.raises(DataError, match="sunrgbd_training_images.txt: the download .* does not match: size"):
        download(tmp_path / "x", "preprocessed", progress=False)
    real_lists = {a.name: a for a in ARCHIVES["preprocessed"] if not a.folder}
    monkeypatch.setitem(ARCHIVES, "preprocessed", tuple(
        dataclasses.replace(a, size=None, sha256=hashlib.sha256(Mirror.files[a.name]).hexdigest()) if a.name in real_lists else a
        for a in ARCHIVES["preprocessed"]))
    from sun_seg.cli import main
    code = main(["download", str(tmp_path / "data"), "--form", "preprocessed", "--prepare", str(tmp_path / "cache"),
                 "--size", "4x5", "--workers", "0", "--remove-archives"])
    assert code == 0, capsys.readouterr().err
    assert detect_form(tmp_path / "data") == "preprocessed"
    assert not any((tmp_path / "data" / "archives").iterdir())
    assert SunRGBD(tmp_path / "cache", "train")[0]["image"].shape == (3, 4, 5)
    assert SunRGBD(tmp_path / "cache", "test").ids == SunRGBD(release, "test").ids


def test_download_cli_reports_errors(tmp_path, mirror, capsys):
    from sun_seg.cli import main
    assert main(["download", str(tmp_path / "d"), "--base-url", mirror]) == 2
    assert "answered 404" in capsys.readouterr().err
