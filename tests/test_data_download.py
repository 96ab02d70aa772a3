"""`fastfvae data download` against a local HTTP server: full, resumed, corrupt, atomic; bad
arguments before any request; errors retrying cannot fix at once; stalls bounded by --timeout."""

import hashlib
import io
import os
import socket
import struct
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from fastfvae.cli import main
from fastfvae.data import DSprites, classes_of, download_dsprites, load_file, save_npz
from fastfvae.data.download import ATTEMPTS_WITHOUT_PROGRESS, DSPRITES_FILENAME, cache_dir, expected_sha256
from fastfvae.data.files import check_npz_archive
from fastfvae.errors import FastFVAEError


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> bytes:
    """A small file in the canonical NPZ format (noisy images so it does not compress away)."""
    rs = np.random.RandomState(0)
    n = 48
    classes = classes_of(np.sort(rs.choice(737280, size=n, replace=False)))
    data = DSprites.from_images((rs.rand(n, 64, 64) < 0.3).astype(np.uint8), classes)
    path = tmp_path_factory.mktemp("payload") / "p.npz"
    save_npz(data, path)
    return path.read_bytes()


class Server:
    """Serves ``payload`` at /<name> with Range support; ``mode`` changes its behaviour.

    Modes: ok, corrupt (one byte flipped), no_range (ignores Range), drop (half, then closes;
    once), stall (headers, then nothing), stall_once (half, then nothing; once),
    http:<code> (always that status), http_once:<code> (that status once).
    """

    def __init__(self, payload: bytes):
        self.payload, self.mode, self.requests, self.final = payload, "ok", [], None
        self.final_seen_during_transfer = []
        self.release = threading.Event()  # set on exit: stalled handlers return
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.requests.append(rng)
                if outer.final is not None:
                    outer.final_seen_during_transfer.append(outer.final.exists())
                if outer.mode.startswith("http"):
                    kind, code = outer.mode.split(":")
                    if kind == "http_once":
                        outer.mode = "ok"
                    self.send_error(int(code))
                    return
                body = outer.payload
                if outer.mode == "corrupt":
                    body = bytearray(body)
                    body[len(body) // 2] ^= 0xFF
                    body = bytes(body)
                start = int(rng[len("bytes="):-1]) if rng and outer.mode != "no_range" else 0
                if start:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if outer.mode in ("stall", "stall_once"):  # a server that stops sending
                    if outer.mode == "stall_once":
                        outer.mode = "ok"
                        self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    outer.release.wait(30)
                    self.close_connection = True
                    return
                if outer.mode == "drop":  # send half, then drop the connection
                    outer.mode = "ok"
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{DSPRITES_FILENAME}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(payload):
    with Server(payload) as s:
        yield s


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_full_download_lands_in_fastfvae_home(server, payload, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFVAE_HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home"
    path = download_dsprites(url=server.url, sha256=sha(payload), progress=False)
    assert path == tmp_path / "home" / DSPRITES_FILENAME
    assert path.read_bytes() == payload
    assert sorted(p.name for p in path.parent.iterdir()) == [DSPRITES_FILENAME]  # no .part left
    assert len(load_file(path, require_full=False)) == 48
    # a second call finds it and does not fetch again
    assert download_dsprites(url=server.url, sha256=sha(payload), progress=False) == path
    assert server.requests == [None]


def test_interrupted_transfer_is_resumed_with_a_range_request(server, payload, tmp_path):
    server.mode = "drop"
    server.final = tmp_path / DSPRITES_FILENAME
    path = download_dsprites(url=server.url, dest=tmp_path, sha256=sha(payload), progress=False)
    assert path.read_bytes() == payload
    half = len(payload) // 2
    assert server.requests == [None, f"bytes={half}-"]
    assert server.final_seen_during_transfer == [False, False]  # never a partial final file


def test_resume_across_calls_after_giving_up(server, payload, tmp_path, capsys):
    server.mode = "drop"
    with pytest.raises(FastFVAEError, match="interrupted") as info:
        download_dsprites(url=server.url, dest=tmp_path, retries=0, progress=False)
    assert "\n" not in str(info.value)
    part = tmp_path / (DSPRITES_FILENAME + ".part")
    assert part.stat().st_size == len(payload) // 2
    assert not (tmp_path / DSPRITES_FILENAME).exists()
    # next run resumes from the partial file (no digest pinned: size, zip CRC and layout check)
    path = download_dsprites(url=server.url, dest=tmp_path, progress=False, require_full=False)
    assert path.read_bytes() == payload and not part.exists()
    assert server.requests[-1] == f"bytes={len(payload) // 2}-"
    assert sha(payload) in capsys.readouterr().err  # the digest is printed so it can be pinned


def test_server_ignoring_range_restarts_cleanly(server, payload, tmp_path):
    (tmp_path / (DSPRITES_FILENAME + ".part")).write_bytes(payload[:100])
    server.mode = "no_range"
    path = download_dsprites(url=server.url, dest=tmp_path, sha256=sha(payload), progress=False)
    assert path.read_bytes() == payload


@pytest.mark.parametrize("pinned", [True, False])
def test_corrupt_payload_is_rejected_and_not_left_behind(server, payload, tmp_path, pinned):
    server.mode = "corrupt"
    digest = sha(payload) if pinned else None
    with pytest.raises(FastFVAEError, match="corrupt") as info:
        download_dsprites(url=server.url, dest=tmp_path, sha256=digest, progress=False)
    assert "nothing was saved" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_digest_from_environment_and_validation(monkeypatch):
    monkeypatch.setenv("FASTFVAE_DSPRITES_SHA256", "AB" * 32)
    assert expected_sha256() == "ab" * 32
    assert expected_sha256("cd" * 32) == "cd" * 32  # the flag wins
    with pytest.raises(FastFVAEError, match="64 hex digits"):
        expected_sha256("xyz")


def test_cli_download(server, payload, tmp_path, capsys):
    assert main(["data", "download", "--url", server.url, "--dest", str(tmp_path), "--sha256", sha(payload)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / DSPRITES_FILENAME)
    server.mode = "corrupt"
    other = tmp_path / "other"
    assert main(["data", "download", "--url", server.url, "--dest", str(other), "--sha256", sha(payload)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastfvae: error: download of") and "Traceback" not in "".join(err)
    assert not other.exists()  # the folder made for --dest goes with the failed download
    assert main(["data", "download", "--url", server.url, "--dest", str(other), "--sha256", "nothex"]) == 2


def test_second_download_into_one_dest_is_refused_naming_the_first(server, payload, tmp_path, capsys):
    """While a download holds ``<dest>/<name>.lock`` (an flock), another one into that folder
    exits 2 with one line naming the holder's PID and touches neither the .part nor the server."""
    import fcntl

    part = tmp_path / (DSPRITES_FILENAME + ".part")
    part.write_bytes(payload[:100])  # the first download's bytes so far
    lock = tmp_path / (DSPRITES_FILENAME + ".lock")
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        code = main(["data", "download", "--url", server.url, "--dest", str(tmp_path), "--sha256", sha(payload)])
        out, err = capsys.readouterr()
        assert code == 2 and out == ""
        assert err == (f"fastfvae: error: another fastfvae download into {tmp_path} is running (PID 4242); "
                       "wait for it to finish or stop it, or choose another --dest\n")
        assert server.requests == [] and part.read_bytes() == payload[:100] and lock.exists()
        assert not (tmp_path / DSPRITES_FILENAME).exists()
    # the holder is gone (its lock with it): the next download resumes the .part, leaves no lock
    path = download_dsprites(url=server.url, dest=tmp_path, sha256=sha(payload), progress=False)
    assert path.read_bytes() == payload and server.requests == ["bytes=100-"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [DSPRITES_FILENAME]


def test_negative_retries_is_a_one_line_error_before_any_work(tmp_path):
    dest = tmp_path / "never-created"
    with pytest.raises(FastFVAEError, match="retries must be 0 or more"):
        download_dsprites(url="http://127.0.0.1:9/unused", dest=dest, retries=-1, progress=False)
    assert not dest.exists()


# --- bad arguments: one line before any request, nothing created ----------------------------
def cli_download(capsys, *argv):
    code = main(["data", "download", *map(str, argv)])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    return code, out, lines


@pytest.mark.parametrize("case", ["dest is a file", "dest in /proc", "not a url", "ftp url", "no host",
                                  "bad port", "zero timeout"])
def test_bad_arguments_fail_before_any_request(case, server, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    dest, url, extra = tmp_path / "new", server.url, []
    expected = {
        "dest is a file": "--dest {dest} is a file; expected a folder",
        "dest in /proc": "--dest {dest}: cannot create or write in this folder",
        "not a url": "URL 'notaurl' is not an http:// or https:// address with a host",
        "ftp url": "URL 'ftp://127.0.0.1/x.npz' is not an http:// or https:// address",
        "no host": "URL 'http:///x.npz' is not an http:// or https:// address with a host",
        "bad port": "URL 'http://127.0.0.1:99999/x.npz' is not valid",
        "zero timeout": "--timeout must be more than 0 seconds, got 0.0",
    }[case]
    if case == "dest is a file":
        dest = tmp_path / "a-file"
    elif case == "dest in /proc":
        dest = "/proc/fastfvae-dest/sub"
    elif case == "zero timeout":
        extra = ["--timeout", "0"]
    else:
        url = {"not a url": "notaurl", "ftp url": "ftp://127.0.0.1/x.npz", "no host": "http:///x.npz",
               "bad port": "http://127.0.0.1:99999/x.npz"}[case]
    code, out, lines = cli_download(capsys, "--url", url, "--dest", dest, *extra)
    assert code == 2 and out == ""
    assert len(lines) == 1 and lines[0].startswith("fastfvae: error: " + expected.format(dest=dest)), lines
    assert server.requests == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    assert not os.path.exists("/proc/fastfvae-dest")


# --- the content is checked, not just the zip ------------------------------------------------
def zip_of(**members: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def test_valid_zip_that_is_not_dsprites_is_not_saved(server, tmp_path):
    server.payload = zip_of(**{"readme.txt": b"not dSprites"})
    dest = tmp_path / "new"
    with pytest.raises(FastFVAEError, match=r"is not the dSprites NPZ \(missing imgs, latents_values, "
                                            r"latents_classes, metadata; expected keys") as info:
        download_dsprites(url=server.url, dest=dest, progress=False, require_full=False)
    assert "nothing was saved" in str(info.value) and "\n" not in str(info.value)
    assert not dest.exists()


def test_subset_is_not_saved_as_the_full_set_without_a_digest(server, tmp_path, capsys):
    code, _, lines = cli_download(capsys, "--url", server.url, "--dest", tmp_path)
    assert code == 2
    assert lines[-1] == (f"fastfvae: error: download of {server.url} is not the dSprites NPZ "
                         "(holds 48 images, expected 737280); nothing was saved")
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_checked_before_it_counts_as_present(server, payload, tmp_path, capsys):
    final = tmp_path / DSPRITES_FILENAME
    final.write_bytes(zip_of(**{"readme.txt": b"a valid zip, not dSprites"}))
    path = download_dsprites(url=server.url, dest=tmp_path, progress=False, require_full=False)
    assert path == final and final.read_bytes() == payload and server.requests == [None]
    err = capsys.readouterr().err
    assert f"{final} is not the dSprites NPZ (missing imgs" in err and "downloading again" in err
    assert "already in" not in err
    # now it is the real thing: found, checked, not fetched again
    assert download_dsprites(url=server.url, dest=tmp_path, progress=False, require_full=False) == final
    assert server.requests == [None] and "already in" in capsys.readouterr().err


def test_existing_file_with_corrupt_image_bytes_is_downloaded_again(server, payload, tmp_path, capsys):
    """A file in the right layout whose image bytes no longer match their CRC-32 is not "already in"."""
    final = tmp_path / DSPRITES_FILENAME
    with zipfile.ZipFile(io.BytesIO(payload)) as zf:  # stored, so an image byte can be flipped in place
        final.write_bytes(zip_of(**{name: zf.read(name) for name in zf.namelist()}))
    with zipfile.ZipFile(final) as zf:
        imgs = zf.getinfo("imgs.npy")
    raw = bytearray(final.read_bytes())
    name_length, extra_length = struct.unpack("<HH", raw[imgs.header_offset + 26:imgs.header_offset + 30])
    raw[imgs.header_offset + 30 + name_length + extra_length + imgs.file_size - 1] ^= 1  # the last pixel
    final.write_bytes(raw)
    check_npz_archive(final, require_full=False)  # the layout check alone still passes it
    path = download_dsprites(url=server.url, dest=tmp_path, progress=False, require_full=False)
    assert path == final and final.read_bytes() == payload and server.requests == [None]
    err = capsys.readouterr().err
    assert f"{final} is corrupt (member imgs.npy fails its CRC check); downloading again" in err
    assert "already in" not in err


# --- errors retrying cannot fix fail at once; real interruptions are resumed -----------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unknown_host_fails_at_once(tmp_path, capsys, monkeypatch):
    lookups = []

    def no_such_host(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    url = f"https://dsprites.invalid/{DSPRITES_FILENAME}"
    code, _, lines = cli_download(capsys, "--url", url, "--dest", tmp_path / "new")
    assert code == 2 and lookups == ["dsprites.invalid"]
    assert lines == [f"fastfvae: error: download of {url} failed: cannot resolve host dsprites.invalid "
                     "(Name or service not known)"]
    assert list(tmp_path.iterdir()) == []


def test_refused_connection_fails_at_once(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/{DSPRITES_FILENAME}"
    code, _, lines = cli_download(capsys, "--url", url, "--dest", tmp_path)
    assert code == 2
    assert lines == [f"fastfvae: error: download of {url} failed: connection refused by {url.split('/')[2]}"]


@pytest.mark.parametrize("status", [403, 404])
def test_http_4xx_fails_at_once(status, server, tmp_path, capsys):
    server.mode = f"http:{status}"
    code, _, lines = cli_download(capsys, "--url", server.url, "--dest", tmp_path)
    assert code == 2 and server.requests == [None]
    assert len(lines) == 1 and f"failed: HTTP {status} " in lines[0]


def test_http_5xx_is_retried(server, payload, tmp_path, capsys):
    server.mode = "http_once:503"
    path = download_dsprites(url=server.url, dest=tmp_path, sha256=sha(payload), progress=False)
    assert path.read_bytes() == payload and server.requests == [None, None]
    assert "HTTP 503 Service Unavailable, retrying (retry 1 of 5)" in capsys.readouterr().err


def test_stalled_server_fails_after_two_timeouts_not_every_retry(server, tmp_path, capsys):
    server.mode = "stall"
    code, _, lines = cli_download(capsys, "--url", server.url, "--dest", tmp_path / "new",
                                  "--timeout", "0.3", "--retries", "5")
    assert code == 2 and ATTEMPTS_WITHOUT_PROGRESS == 2
    # the lines below count the attempts; the server may not have logged a request that timed
    # out while it was still being accepted, so only "no more than two, none a resume" here
    assert len(server.requests) <= 2 and set(server.requests) <= {None}
    host = server.url.split("/")[2]
    assert lines[-1] == (f"fastfvae: error: download of {server.url} failed: no data from {host} for 0.3 s "
                         "on 2 attempts in a row (--timeout sets how long to wait)")
    assert lines[:-1] == [f"fastfvae: no data from {host} for 0.3 s, retrying (retry 1 of 5)"]
    assert list(tmp_path.iterdir()) == []


def test_stall_mid_transfer_is_resumed(server, payload, tmp_path, capsys, monkeypatch):
    """The first attempt stalls (a short timeout ends it); the resume must succeed, so it gets
    5 s: a scheduling gap on a busy machine cannot add a retry."""
    import fastfvae.data.download as download

    fetch, timeouts = download._fetch_once, iter([0.5])
    monkeypatch.setattr(download, "_fetch_once",
                        lambda url, part, timeout, *rest: fetch(url, part, next(timeouts, timeout), *rest))
    server.mode = "stall_once"
    path = download_dsprites(url=server.url, dest=tmp_path, sha256=sha(payload), timeout=5, progress=False)
    assert path.read_bytes() == payload
    first, resumed = server.requests  # one stalled attempt, one resume
    kept = int(resumed.removeprefix("bytes=").removesuffix("-"))
    assert first is None and 0 < kept <= len(payload) // 2  # all of the half sent, unless it was slow
    assert f"transfer interrupted after {kept} bytes (no data from" in capsys.readouterr().err


def test_nonpositive_timeout_is_rejected_before_any_work(tmp_path):
    dest = tmp_path / "never-created"
    with pytest.raises(FastFVAEError, match="timeout must be more than 0 seconds"):
        download_dsprites(url="http://127.0.0.1:9/unused", dest=dest, timeout=0, progress=False)
    assert not dest.exists()
