"""`fastfvae data download` against a local HTTP server: full, resumed, corrupt, atomic."""

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from fastfvae.cli import main
from fastfvae.data import DSprites, classes_of, download_dsprites, load_file, save_npz
from fastfvae.data.download import DSPRITES_FILENAME, cache_dir, expected_sha256
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
    """Serves ``payload`` at /<name> with Range support; ``mode`` changes its behaviour."""

    def __init__(self, payload: bytes):
        self.payload, self.mode, self.requests, self.final = payload, "ok", [], None
        self.final_seen_during_transfer = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.requests.append(rng)
                if outer.final is not None:
                    outer.final_seen_during_transfer.append(outer.final.exists())
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
                if outer.mode == "drop":  # send half, then drop the connection
                    outer.mode = "ok"
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{DSPRITES_FILENAME}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
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
    # next run resumes from the partial file (no digest pinned: size + zip CRC check)
    path = download_dsprites(url=server.url, dest=tmp_path, progress=False)
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
    assert list(other.iterdir()) == []
    assert main(["data", "download", "--url", server.url, "--dest", str(other), "--sha256", "nothex"]) == 2


def test_negative_retries_is_a_one_line_error_before_any_work(tmp_path):
    dest = tmp_path / "never-created"
    with pytest.raises(FastFVAEError, match="retries must be 0 or more"):
        download_dsprites(url="http://127.0.0.1:9/unused", dest=dest, retries=-1, progress=False)
    assert not dest.exists()
