"""Web corpora over HTTP: small real parquet shards (stdlib sources) served from 127.0.0.1, downloaded and prepared.

The server misbehaves on request (drops a connection mid-file, 404, 500, 429, corrupted bytes, a wrong
published sha256) so every path of trainer/download.py runs against a real socket.
"""

from __future__ import annotations

import hashlib
import io
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trainer import data as tdata
from trainer.download import CorruptDownload, DownloadError, download

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


DOCS = 15  # documents a shard


def _shards(n: int) -> dict[str, bytes]:
    """n parquet shards of DOCS real documents each (stdlib sources, cut short so tokenizing takes no time),
    named as climbmix names its shards."""
    src = Path(tdata.sysconfig.get_paths()["stdlib"])
    texts = [p.read_text()[:3000] for p in sorted(src.glob("*.py"))[:DOCS * n]]
    out = {}
    for i in range(n):
        buf = io.BytesIO()
        pq.write_table(pa.table({"text": texts[DOCS * i:DOCS * (i + 1)]}), buf)
        out[f"shard_{i:05d}.parquet"] = buf.getvalue()
    return out


class Shards(ThreadingHTTPServer):
    """Serves `files` by name with Range support; `plan[name]` lists what the next requests get instead:
    'drop' (half the file, then the connection closes), '404', '500', '429', 'garbage' (right size, wrong bytes),
    'bad-sha' (the file with a wrong X-Linked-Etag). Every request is logged as (name, Range header)."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files, self.plan, self.log = dict(files), {}, []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        srv: Shards = self.server
        name = self.path.rsplit("/", 1)[-1]
        srv.log.append((name, self.headers.get("Range")))
        body = srv.files.get(name)
        step = srv.plan.get(name, []).pop(0) if srv.plan.get(name) else None
        if body is None or step == "404":
            return self.send_error(404)
        if step in ("500", "429"):
            self.send_response(int(step))
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        if step == "garbage":  # and no sha256 published: only the parquet check can tell
            body = bytes(len(body))
        else:
            sha = hashlib.sha256(b"other" if step == "bad-sha" else body).hexdigest()
            self.send_header("X-Linked-Etag", f'"{sha}"')
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if step == "drop":
            self.wfile.write(body[start:len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server():
    srv = Shards(_shards(3))
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _spec(srv, n=2):
    return f"parquet:{srv.url}/data/shard_{{:05d}}.parquet:{n}"


def test_download_and_prepare_a_parquet_url_set_then_nothing_again(server, tmp_path):
    out, did = tdata.prepare(_spec(server), 512, home=tmp_path)
    m = tdata.load_manifest(out)
    # shard 0 is the pinned validation shard of a custom set; 1..N are trained on
    assert did and m["shards"] == {"train": ["shard_00001.parquet", "shard_00002.parquet"],
                                   "val": ["shard_00000.parquet"]}
    assert m["documents"] == {"train": 2 * DOCS, "val": DOCS}
    assert all(d.startswith("shard_00000.parquet#") for d in m["val_documents"])
    assert m["tokens"]["val"] > 1000 and tdata.verify_fingerprints(out)
    cached = tmp_path / "cache" / tdata.web_corpus(_spec(server))[0].name
    assert {p.name for p in cached.iterdir()} == {"shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"}
    assert (cached / "shard_00001.parquet").read_bytes() == server.files["shard_00001.parquet"]

    requests = len(server.log)
    assert tdata.prepare(_spec(server), 512, home=tmp_path) == (out, False)
    assert len(server.log) == requests  # idempotent: nothing asked of the server
    # the same shards for another vocabulary: prepared again, but nothing downloaded
    assert tdata.prepare(_spec(server), 300, home=tmp_path)[1] is True
    assert len(server.log) == requests


def test_climbmix_from_a_mirror_pins_its_last_shard_for_validation(server, tmp_path, monkeypatch):
    server.files["shard_06542.parquet"] = server.files.pop("shard_00002.parquet")
    monkeypatch.setenv(tdata.BASE_URL_ENV, server.url + "/mirror/")
    out, did = tdata.prepare("climbmix:2", 512, home=tmp_path)
    m = tdata.load_manifest(out)
    assert m["shards"] == {"train": ["shard_00000.parquet", "shard_00001.parquet"], "val": ["shard_06542.parquet"]}
    assert sorted(name for name, _ in server.log) == ["shard_00000.parquet", "shard_00001.parquet",
                                                      "shard_06542.parquet"]
    assert tdata.default_vocab_size("climbmix") == 8192 == tdata.default_vocab_size(_spec(server))


def test_a_dropped_connection_resumes_with_a_range_request(server, tmp_path):
    server.plan["shard_00001.parquet"] = ["drop"]
    dest = tmp_path / "shard_00001.parquet"
    got = download([(f"{server.url}/shard_00001.parquet", dest)], backoff_s=0)
    body = server.files["shard_00001.parquet"]
    assert dest.read_bytes() == body and not dest.with_name(dest.name + ".partial").exists()
    assert server.log == [("shard_00001.parquet", None), ("shard_00001.parquet", f"bytes={len(body) // 2}-")]
    assert got == len(body)  # the first half was not fetched twice


def test_404_fails_at_once_and_500_after_its_retries_naming_the_url(server, tmp_path):
    url = f"{server.url}/missing.parquet"
    with pytest.raises(DownloadError, match=rf"{url}: HTTP 404"):
        download([(url, tmp_path / "a.parquet")], backoff_s=0)
    assert server.log == [("missing.parquet", None)]  # a 4xx is not retried

    server.log.clear()
    server.plan["shard_00000.parquet"] = ["500"] * 3
    url = f"{server.url}/shard_00000.parquet"
    with pytest.raises(DownloadError, match=rf"{url}: HTTP 500 .*gave up after 3 attempts"):
        download([(url, tmp_path / "b.parquet")], attempts=3, backoff_s=0)
    assert len(server.log) == 3 and not list(tmp_path.iterdir())

    server.plan["shard_00000.parquet"] = ["500", "429"]  # passing failures: retried, then the file arrives
    download([(url, tmp_path / "b.parquet")], attempts=3, backoff_s=0)
    assert (tmp_path / "b.parquet").read_bytes() == server.files["shard_00000.parquet"]


def test_a_corrupted_shard_is_refused_and_deleted_then_fetched_again(server, tmp_path):
    server.plan["shard_00002.parquet"] = ["garbage"]
    with pytest.raises(tdata.CorpusError, match=r"shard_00002.parquet arrived corrupted .*run again"):
        tdata.prepare(_spec(server), 512, home=tmp_path)
    cached = tmp_path / "cache" / tdata.web_corpus(_spec(server))[0].name
    assert "shard_00002.parquet" not in {p.name for p in cached.iterdir()}
    assert not (tmp_path / "data").exists() or not list((tmp_path / "data").iterdir())  # no half-prepared dir

    server.plan["shard_00001.parquet"] = ["bad-sha"]  # right bytes, but not what the server says they hash to
    dest = tmp_path / "x.parquet"
    with pytest.raises(CorruptDownload, match="sha256 differs"):
        download([(f"{server.url}/shard_00001.parquet", dest)], backoff_s=0)
    assert not dest.exists() and not dest.with_name("x.parquet.partial").exists()

    assert tdata.prepare(_spec(server), 512, home=tmp_path)[1] is True  # the rerun fetches it anew
    # a cached shard damaged later (on disk) is refused when read, and deleted so the next run fetches it
    shard = cached / "shard_00001.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(tdata.CorpusError, match="corrupted.*deleted it"):
        tdata.prepare(_spec(server), 300, home=tmp_path)
    assert not shard.exists()


def test_cli_prepares_from_a_base_url_and_says_when_there_is_nothing_to_do(server, tmp_path, restore_environ):
    from bot.cli import app

    server.files["shard_06542.parquet"] = server.files["shard_00002.parquet"]
    args = ["data", "prepare", "--corpus", "climbmix:1", "--vocab-size", "400", "--base-url", server.url]
    env = {"RATCHET_HOME": str(tmp_path), "RATCHET_CONFIG": ""}
    first = CliRunner().invoke(app, args, env=env)
    assert first.exit_code == 0, first.output
    assert "climbmix:1: vocab 400" in first.output
    again = CliRunner().invoke(app, args, env=env)
    assert again.exit_code == 0 and "already prepared, nothing to do" in again.output
    missing = CliRunner().invoke(app, ["data", "prepare", "--corpus", "fineweb-edu:1", "--base-url", server.url],
                                 env=env)
    assert missing.exit_code == 2 and f"{server.url}/shard_01822.parquet: HTTP 404" in missing.output
