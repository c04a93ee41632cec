"""fetch(): hash-verified (pinned or trusted on first use), atomic downloads, against a
loopback HTTP server; the fetch_weights rule."""

from __future__ import annotations

import hashlib
import http.server
import json
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from finegrained.errors import WeightsError
from finegrained.models.download import fetch, read_recorded_sha256, verify_recorded_sha256

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
        elif self.path == "/unannounced.bin":          # no Content-Length: ends at close
            self.send_response(200)
            self.end_headers()
            self.wfile.write(PAYLOAD)
            self.close_connection = True
        elif self.path == "/trickle.bin":              # a byte every 50 ms: never a read timeout
            self.send_response(200)
            self.send_header("Content-Length", "200")
            self.end_headers()
            for _ in range(200):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
        elif self.path == "/moved.bin":
            self.send_response(302)
            self.send_header("Location", "/weights.bin")
            self.end_headers()
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


def get(url, sha256, dest, **kwargs):
    """fetch() from the loopback server, which speaks plain http (allowed here on purpose)."""
    return fetch(url, sha256, dest, allow_http=True, **kwargs)


def test_good_hash_writes_file(server, tmp_path):
    _, base = server
    dest = tmp_path / "sub" / "weights.bin"
    assert get(f"{base}/weights.bin", GOOD, dest, chunk_size=65536) == dest
    assert dest.read_bytes() == PAYLOAD
    assert _leftovers(dest.parent) == ["weights.bin", "weights.bin.sha256"]
    assert (dest.parent / "weights.bin.sha256").read_text() == f"{GOOD}  weights.bin\n"


def test_hash_accepted_in_upper_case(server, tmp_path):
    _, base = server
    get(f"{base}/weights.bin", GOOD.upper(), tmp_path / "w.bin")
    assert (tmp_path / "w.bin").read_bytes() == PAYLOAD


def test_bad_hash_leaves_nothing(server, tmp_path):
    _, base = server
    dest = tmp_path / "weights.bin"
    with pytest.raises(WeightsError) as info:
        get(f"{base}/weights.bin", BAD, dest)
    message = str(info.value)
    assert f"{base}/weights.bin" in message and BAD in message and GOOD in message
    assert _leftovers(tmp_path) == []


def test_interrupted_transfer_leaves_nothing(server, tmp_path):
    _, base = server
    with pytest.raises(WeightsError, match="interrupted|transfer failed"):
        get(f"{base}/truncated.bin", GOOD, tmp_path / "weights.bin", timeout=10)
    assert _leftovers(tmp_path) == []


def test_timeout_leaves_nothing(server, tmp_path):
    _, base = server
    start = time.monotonic()
    with pytest.raises(WeightsError, match="timed out|transfer failed"):
        get(f"{base}/slow.bin", GOOD, tmp_path / "weights.bin", timeout=0.3)
    assert time.monotonic() - start < 5
    assert _leftovers(tmp_path) == []


def test_http_error_is_weights_error(server, tmp_path):
    _, base = server
    with pytest.raises(WeightsError, match="404"):
        get(f"{base}/nope.bin", GOOD, tmp_path / "weights.bin")
    assert _leftovers(tmp_path) == []


def test_existing_good_file_not_downloaded_again(server, tmp_path):
    httpd, base = server
    dest = tmp_path / "weights.bin"
    get(f"{base}/weights.bin", GOOD, dest)
    mtime = dest.stat().st_mtime_ns
    get(f"{base}/weights.bin", GOOD, dest)
    assert httpd.hits["/weights.bin"] == 1
    assert dest.stat().st_mtime_ns == mtime


def test_existing_bad_file_replaced(server, tmp_path):
    httpd, base = server
    dest = tmp_path / "weights.bin"
    dest.write_bytes(b"stale")
    get(f"{base}/weights.bin", GOOD, dest)
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
    assert _leftovers(out) == ["a.bin", "a.bin.sha256", "b.bin", "b.bin.sha256"]


def test_plain_http_is_refused_unless_allowed(server, tmp_path):
    httpd, base = server
    with pytest.raises(WeightsError, match="plain http is refused"):
        fetch(f"{base}/weights.bin", GOOD, tmp_path / "w.bin")
    assert _leftovers(tmp_path) == [] and httpd.hits == {}
    get(f"{base}/moved.bin", GOOD, tmp_path / "w.bin")          # http -> http, allowed
    assert (tmp_path / "w.bin").read_bytes() == PAYLOAD


@pytest.mark.parametrize("new, allow_http, ok", [
    ("https://mirror.org/w.bin", False, True),
    ("http://mirror.org/w.bin", False, False),      # a downgrade
    ("http://mirror.org/w.bin", True, True),
    ("file:///etc/passwd", True, False),
    ("ftp://mirror.org/w.bin", True, False),
])
def test_redirects_keep_to_https_and_http(new, allow_http, ok):
    import urllib.request

    from finegrained.models.download import _RedirectPolicy
    request = urllib.request.Request("https://example.org/w.bin")
    policy = _RedirectPolicy(allow_http)
    if ok:
        assert policy.redirect_request(request, None, 302, "Found", {}, new).full_url == new
    else:
        with pytest.raises(WeightsError, match="redirected to .* refused"):
            policy.redirect_request(request, None, 302, "Found", {}, new)


@pytest.mark.parametrize("path", ["/weights.bin", "/unannounced.bin"])
def test_more_than_max_bytes_is_refused(server, tmp_path, path):
    """Announced (Content-Length) or only received: stopped at the cap, nothing left."""
    _, base = server
    with pytest.raises(WeightsError, match="weights_max_bytes"):
        get(f"{base}{path}", None, tmp_path / "w.bin", max_bytes=100_000, chunk_size=4096)
    assert _leftovers(tmp_path) == []


def test_a_trickling_server_meets_the_overall_timeout(server, tmp_path):
    """A byte every 50 ms never trips the per-read timeout; the whole transfer's does."""
    _, base = server
    start = time.monotonic()
    with pytest.raises(WeightsError, match="not done after 0.5 s"):
        get(f"{base}/trickle.bin", None, tmp_path / "w.bin", timeout=5, timeout_s=0.5)
    assert time.monotonic() - start < 3
    assert _leftovers(tmp_path) == []


def test_malformed_hash_refused(tmp_path):
    with pytest.raises(WeightsError, match="64 hex"):
        fetch("file:///nonexistent", "abc", tmp_path / "x.bin")


def _script(repo_root, url, sha256, out):
    settings = {"url": url, "sha256": sha256, "allow_http": False, "max_bytes": 10 ** 9,
                "timeout_s": 60}
    return subprocess.run([sys.executable, repo_root / "scripts" / "fetch_weights.py",
                           "--settings", json.dumps(settings), "--out", out],
                          capture_output=True, text=True, timeout=60)


def test_script(repo_root, tmp_path):
    source = tmp_path / "weights.bin"
    source.write_bytes(PAYLOAD)
    ok = _script(repo_root, source.as_uri(), GOOD, tmp_path / "out" / "w.bin")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "w.bin").read_bytes() == PAYLOAD
    bad = _script(repo_root, source.as_uri(), BAD, tmp_path / "out" / "bad.bin")
    assert bad.returncode == 1 and "sha256 mismatch" in bad.stderr
    assert not (tmp_path / "out" / "bad.bin").exists()


def _fetch_rule(workdir: Path, url: str, sha256: str | None, *, strict: bool = False):
    """Run the workflow's fetch_weights rule (only) in ``workdir``."""
    import os
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    backbone = {"weights": url, "weights_sha256": sha256, "weights_require_sha256": strict,
                "weights_allow_http": url.startswith("http://")}
    configfile = workdir / "fetch.yaml"
    configfile.write_text(json.dumps({"backbone": backbone, "dataset": {"root": str(workdir)}}))
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(workdir),
         "--cores", "1", "fetch_weights", "--configfile", str(configfile)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=120)


def _rule_target(workdir: Path, url: str) -> Path:
    """resources/weights/<host>-<hash of the port>/<path>: where the rule puts a URL's file."""
    parts = urllib.parse.urlsplit(url)
    folder = f"{parts.hostname}-{hashlib.sha256(f'{parts.port}?'.encode()).hexdigest()[:12]}"
    return workdir / "resources" / "weights" / folder / parts.path.lstrip("/")


@pytest.mark.parametrize("path, sha256, ok", [
    ("/weights.bin", GOOD, True),
    ("/weights.bin", None, True),        # trust on first use
    ("/weights.bin", BAD, False),
    ("/truncated.bin", GOOD, False),
    ("/truncated.bin", None, False),
])
def test_fetch_weights_rule(server, tmp_path, path, sha256, ok):
    _, base = server
    own = tmp_path / "resources" / "weights" / "my_own.safetensors"   # a user's file, beside
    own.parent.mkdir(parents=True)
    own.write_bytes(b"mine")
    proc = _fetch_rule(tmp_path, base + path, sha256)
    target = _rule_target(tmp_path, base + path)
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    log = (tmp_path / "resources" / "logs" / "fetch_weights" /
           f"{target.relative_to(tmp_path / 'resources' / 'weights')}.log").read_text()
    if ok:
        assert target.read_bytes() == PAYLOAD
        assert target.with_name(target.name + ".sha256").read_text().split()[0] == GOOD
        assert GOOD in log, log                          # the hash is shown in the log
    else:
        assert not target.parent.exists() or _leftovers(target.parent) == []
        assert "error" in log and base + path in log, log
        if sha256 == BAD:
            assert GOOD in log and BAD in log, log
    assert own.read_bytes() == b"mine"


def test_user_file_in_resources_weights_is_no_rule_output(tmp_path):
    """Only the file the config names can be fetched; a user's own file there cannot."""
    own = tmp_path / "resources" / "weights" / "my_own.safetensors"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"mine")
    import os
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(tmp_path),
         "--cores", "1", "-n", "--forcerun", "resources/weights/my_own.safetensors",
         "--config", "backbone={weights: 'https://example.org/w/model.safetensors'}",
         f"dataset={{root: '{tmp_path}'}}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "fetch_weights" not in proc.stdout
    assert own.read_bytes() == b"mine"


def test_strict_mode_requires_a_hash(tmp_path):
    proc = _fetch_rule(tmp_path, "https://example.org/w/model.safetensors", None, strict=True)
    assert proc.returncode != 0 and "weights_sha256 is required" in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- trust on first use


def test_first_use_records_the_hash_and_later_uses_check_it(server, tmp_path, caplog):
    httpd, base = server
    dest = tmp_path / "w" / "weights.bin"
    with caplog.at_level("INFO", logger="finegrained.models.download"):
        get(f"{base}/weights.bin", None, dest)
    assert GOOD in caplog.text and "first use" in caplog.text
    # the line to paste under `backbone:` to pin it, on a line of its own
    assert f"\n    weights_sha256: {GOOD}" in caplog.text
    assert read_recorded_sha256(dest) == GOOD
    assert verify_recorded_sha256(dest) == GOOD
    get(f"{base}/weights.bin", None, dest)             # present and as recorded: kept
    assert httpd.hits["/weights.bin"] == 1
    dest.write_bytes(PAYLOAD[:-1] + b"X")                # changed on disk afterwards
    with pytest.raises(WeightsError, match="differs from .* recorded"):
        verify_recorded_sha256(dest)
    with pytest.raises(WeightsError, match=str(dest)):
        get(f"{base}/weights.bin", None, dest)
    assert httpd.hits["/weights.bin"] == 1


def test_first_use_without_a_record_downloads_again(server, tmp_path):
    httpd, base = server
    dest = tmp_path / "weights.bin"
    dest.write_bytes(b"from an interrupted earlier run, no record")
    get(f"{base}/weights.bin", None, dest)
    assert dest.read_bytes() == PAYLOAD and httpd.hits["/weights.bin"] == 1


def test_script_without_hash_trusts_on_first_use(repo_root, tmp_path):
    source = tmp_path / "weights.bin"
    source.write_bytes(PAYLOAD)
    ok = _script(repo_root, source.as_uri(), None, tmp_path / "out" / "w.bin")
    assert ok.returncode == 0, ok.stderr
    assert f"under `backbone:` in your config file:\n    weights_sha256: {GOOD}" in ok.stderr
    assert (tmp_path / "out" / "w.bin.sha256").read_text() == f"{GOOD}  w.bin\n"
