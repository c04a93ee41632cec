"""fetch(): hash-verified, atomic downloads, against a loopback HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from finegrained.errors import WeightsError
from finegrained.models.download import fetch

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # ~1 MiB, not a multiple of the chunk size
GOOD = hashlib.sha256(PAYLOAD).hexdigest()
BAD = "0" * 64


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: dict[str, int]

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        self.server.hits[self.path] = self.server.hits.get(self.path, 0) + 1
        if self.path == "/weights.bin":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path == "/truncated.bin":
            # Promise the whole payload, send half, hang up.
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif self.path == "/slow.bin":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:10])
            self.wfile.flush()
            time.sleep(1.5)
        else:
            self.send_error(404)


@pytest.fixture()
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.hits = {}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_good_hash_writes_file(server, tmp_path):
    _, base = server
    dest = tmp_path / "sub" / "weights.bin"
    assert fetch(f"{base}/weights.bin", GOOD, dest, chunk_size=65536) == dest
    assert dest.read_bytes() == PAYLOAD
    assert _leftovers(dest.parent) == ["weights.bin"]


def test_hash_accepted_in_upper_case(server, tmp_path):
    _, base = server
    fetch(f"{base}/weights.bin", GOOD.upper(), tmp_path / "w.bin")
    assert (tmp_path / "w.bin").read_bytes() == PAYLOAD


def test_bad_hash_leaves_nothing(server, tmp_path):
    _, base = server
    dest = tmp_path / "weights.bin"
    with pytest.raises(WeightsError) as info:
        fetch(f"{base}/weights.bin", BAD, dest)
    message = str(info.value)
    assert f"{base}/weights.bin" in message and BAD in message and GOOD in message
    assert _leftovers(tmp_path) == []


def test_interrupted_transfer_leaves_nothing(server, tmp_path):
    _, base = server
    with pytest.raises(WeightsError, match="interrupted|transfer failed"):
        fetch(f"{base}/truncated.bin", GOOD, tmp_path / "weights.bin", timeout=10)
    assert _leftovers(tmp_path) == []


def test_timeout_leaves_nothing(server, tmp_path):
    _, base = server
    start = time.monotonic()
    with pytest.raises(WeightsError, match="timed out|transfer failed"):
        fetch(f"{base}/slow.bin", GOOD, tmp_path / "weights.bin", timeout=0.3)
    assert time.monotonic() - start < 5
    assert _leftovers(tmp_path) == []


def test_http_error_is_weights_error(server, tmp_path):
    _, base = server
    with pytest.raises(WeightsError, match="404"):
        fetch(f"{base}/nope.bin", GOOD, tmp_path / "weights.bin")
    assert _leftovers(tmp_path) == []


def test_existing_good_file_not_downloaded_again(server, tmp_path):
    httpd, base = server
    dest = tmp_path / "weights.bin"
    fetch(f"{base}/weights.bin", GOOD, dest)
    mtime = dest.stat().st_mtime_ns
    fetch(f"{base}/weights.bin", GOOD, dest)
    assert httpd.hits["/weights.bin"] == 1
    assert dest.stat().st_mtime_ns == mtime


def test_existing_bad_file_replaced(server, tmp_path):
    httpd, base = server
    dest = tmp_path / "weights.bin"
    dest.write_bytes(b"stale")
    fetch(f"{base}/weights.bin", GOOD, dest)
    assert dest.read_bytes() == PAYLOAD and httpd.hits["/weights.bin"] == 1


def test_file_url_and_local_path(tmp_path):
    source = tmp_path / "src" / "weights.bin"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    out = tmp_path / "out"
    fetch(source.as_uri(), GOOD, out / "a.bin")
    fetch(str(source), GOOD, out / "b.bin")
    assert (out / "a.bin").read_bytes() == PAYLOAD == (out / "b.bin").read_bytes()
    with pytest.raises(WeightsError):
        fetch(source.as_uri(), BAD, out / "c.bin")
    with pytest.raises(WeightsError):
        fetch(str(tmp_path / "absent.bin"), GOOD, out / "d.bin")
    assert _leftovers(out) == ["a.bin", "b.bin"]


def test_malformed_hash_refused(tmp_path):
    with pytest.raises(WeightsError, match="64 hex"):
        fetch("file:///nonexistent", "abc", tmp_path / "x.bin")


def test_script(repo_root, tmp_path):
    source = tmp_path / "weights.bin"
    source.write_bytes(PAYLOAD)
    script = repo_root / "scripts" / "fetch_weights.py"
    ok = subprocess.run([sys.executable, script, "--url", source.as_uri(), "--sha256", GOOD,
                         "--out", tmp_path / "out" / "w.bin"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "w.bin").read_bytes() == PAYLOAD
    bad = subprocess.run([sys.executable, script, "--url", source.as_uri(), "--sha256", BAD,
                          "--out", tmp_path / "out" / "bad.bin"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "sha256 mismatch" in bad.stderr
    assert not (tmp_path / "out" / "bad.bin").exists()


def _fetch_rule(workdir: Path, url: str, sha256: str):
    """Run the workflow's fetch_weights rule (only) in ``workdir``."""
    import os
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    name = url.rsplit("/", 1)[1]
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(workdir),
         "--cores", "1", f"resources/weights/{name}",
         "--config", f"backbone={{weights: '{url}', weights_sha256: '{sha256}'}}",
         f"dataset={{root: '{workdir}'}}"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("path, sha256, ok", [
    ("/weights.bin", GOOD, True),
    ("/weights.bin", BAD, False),
    ("/truncated.bin", GOOD, False),
])
def test_fetch_weights_rule(server, tmp_path, path, sha256, ok):
    _, base = server
    proc = _fetch_rule(tmp_path, base + path, sha256)
    target = tmp_path / "resources" / "weights" / path.lstrip("/")
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    if ok:
        assert target.read_bytes() == PAYLOAD
    else:
        assert not target.parent.exists() or _leftovers(target.parent) == []
        log = (tmp_path / "resources" / "logs" / "fetch_weights" / f"{target.name}.log").read_text()
        assert "error" in log and base + path in log, log
        if sha256 == BAD:
            assert GOOD in log and BAD in log, log
