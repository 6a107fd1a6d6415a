"""Large files over HTTP (httpx): resumed, retried, checked and fetched a few at a time, with one progress bar.

Knows nothing of what the files hold (a `check` callback judges that); writes only the destinations given
and their `.partial` files beside them.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Optional, Sequence

import httpx

ATTEMPTS = 6  # tries per file (the first and five retries)
BACKOFF_S = 1.0  # the first wait; doubled each retry (1, 2, 4, 8, 16 s), as nanochat's 2**attempt
MAX_WAIT_S = 120.0  # no wait is longer, not even a server's Retry-After
WORKERS = 4  # files at once (nanochat's default of 4 download workers)
TIMEOUT = httpx.Timeout(30.0)  # connect / read / write / pool; a read that stalls this long is retried (resumed)
CHUNK = 1 << 20
# Hugging Face puts the sha256 and size of an LFS file on the resolve response as X-Linked-Etag / X-Linked-Size
# (huggingface_hub's file metadata reads the same headers).
SHA256_HEADER, SIZE_HEADER = "x-linked-etag", "x-linked-size"


class DownloadError(RuntimeError):
    """A file could not be fetched; the message names the URL and why (HTTP status, connection error)."""


class CorruptDownload(DownloadError):
    """A file arrived but its size, sha256 or content check is wrong; it was deleted, so a rerun fetches it again."""


class _Transient(Exception):
    """Worth another try: the connection failed or ended early, a 5xx, a 429."""

    def __init__(self, why: str, retry_after: Optional[float] = None):
        super().__init__(why)
        self.retry_after = retry_after


class _Aborted(Exception):
    """Another file failed; this one stops, keeping its `.partial` for the next run."""


def download(files: Sequence[tuple[str, Path]], *, check: Optional[Callable[[Path], None]] = None,
             workers: int = WORKERS, attempts: int = ATTEMPTS, backoff_s: float = BACKOFF_S, console=None) -> int:
    """Fetch every (url, destination) whose destination does not exist yet; returns the bytes received.

    Each file streams into `<destination>.partial`, which a later call resumes with a Range request; it is
    renamed to the destination only once its size (Content-Length / Content-Range / X-Linked-Size), its sha256
    (X-Linked-Etag, where the server publishes one) and `check(path)` (which raises on bad content) pass.
    Connection errors, 5xx and 429 are retried up to `attempts` times, waiting `backoff_s` doubled each time
    or the server's Retry-After (at most MAX_WAIT_S). `workers` files are fetched at once.
    Raises DownloadError naming the URL (404 and other 4xx at once, others after the last attempt), or
    CorruptDownload (the bad file deleted). On the first failure the other files stop, keeping their partials.
    """
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, \
        TransferSpeedColumn

    todo = [(url, Path(dest)) for url, dest in files if not Path(dest).exists()]
    if not todo:
        return 0
    abort = threading.Event()
    client = httpx.Client(follow_redirects=True, timeout=TIMEOUT, trust_env=True,
                          limits=httpx.Limits(max_connections=workers),
                          # ranges and sizes are of the bytes on the wire: ask for them unencoded
                          headers={"Accept-Encoding": "identity", "User-Agent": "ratchet"})
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with client, Progress(*columns, console=console or Console(stderr=True)) as bar, \
            ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
        tally = _Tally(bar, len(todo))
        futures = [pool.submit(_fetch, client, url, dest, check, attempts, backoff_s, tally, abort)
                   for url, dest in todo]
        try:
            for fut in as_completed(futures):
                fut.result()
        except BaseException:
            abort.set()  # the other downloads stop at their next chunk, keeping their partials
            raise
    return tally.received


class _Tally:
    """Bytes received against an estimated total (known sizes, plus their mean for each file not yet started)."""

    def __init__(self, bar, n_files: int):
        self.bar, self.n_files, self.lock = bar, n_files, threading.Lock()
        self.sizes: dict[str, Optional[int]] = {}
        self.have: dict[str, int] = {}
        self.files_done = self.received = 0
        self.task = bar.add_task(f"0/{n_files} files", total=None)

    def start(self, url: str, size: Optional[int], have: int) -> None:
        with self.lock:
            self.sizes[url], self.have[url] = size, have
            self._show()

    def advance(self, url: str, n: int) -> None:
        with self.lock:
            self.have[url] += n
            self.received += n
            self._show()

    def finished(self) -> None:
        with self.lock:
            self.files_done += 1
            self._show()

    def _show(self) -> None:
        known = [s for s in self.sizes.values() if s]
        total = sum(known) + sum(known) // len(known) * (self.n_files - len(known)) if known else None
        self.bar.update(self.task, total=total, completed=sum(self.have.values()),
                        description=f"{self.files_done}/{self.n_files} files")


def _fetch(client: httpx.Client, url: str, dest: Path, check, attempts: int, backoff_s: float, tally: _Tally,
           abort: threading.Event) -> None:
    part = dest.with_name(dest.name + ".partial")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        if abort.is_set():
            raise _Aborted()
        try:
            size, sha256 = _fetch_once(client, url, part, tally, abort)
            break
        except httpx.UnsupportedProtocol as e:
            raise DownloadError(f"could not download {url}: {e}") from None
        except OSError as e:  # the disk, not the network: retrying would not help
            raise DownloadError(f"could not write {part}: {e}") from None
        except (_Transient, httpx.TransportError) as e:
            why = f"{type(e).__name__}: {e}" if isinstance(e, httpx.TransportError) else str(e)
            if attempt == attempts:
                raise DownloadError(f"could not download {url}: {why} (gave up after {attempts} attempts)") from None
            wait = getattr(e, "retry_after", None)
            if abort.wait(min(MAX_WAIT_S, backoff_s * 2 ** (attempt - 1) if wait is None else wait)):
                raise _Aborted() from None
    got = part.stat().st_size
    try:
        if size is not None and got != size:
            raise ValueError(f"{got} bytes, the server announced {size}")
        if sha256 and _sha256(part) != sha256:
            raise ValueError(f"sha256 differs from the published {sha256[:12]}…")
        if check:
            check(part)
    except Exception as e:
        part.unlink(missing_ok=True)
        raise CorruptDownload(f"{url} arrived corrupted ({e}); deleted it, run again to fetch it anew") from None
    os.replace(part, dest)
    tally.finished()


def _fetch_once(client: httpx.Client, url: str, part: Path, tally: _Tally,
                abort: threading.Event) -> tuple[Optional[int], Optional[str]]:
    """One GET (resuming `part` when it exists); returns the file's announced size and published sha256."""
    have = part.stat().st_size if part.exists() else 0
    with client.stream("GET", url, headers={"Range": f"bytes={have}-"} if have else None) as r:
        if r.status_code == 416:  # the partial is not a prefix of what the server has now
            part.unlink(missing_ok=True)
            raise _Transient("HTTP 416, starting the file over", retry_after=0)
        if r.status_code == 429 or r.status_code >= 500:
            raise _Transient(f"HTTP {r.status_code} {r.reason_phrase}", _retry_after(r.headers.get("retry-after")))
        if r.status_code not in (200, 206):
            raise DownloadError(f"could not download {url}: HTTP {r.status_code} {r.reason_phrase}")
        sha256, size = _published(r)
        if r.status_code == 206:
            start, total = _content_range(r.headers.get("content-range", ""))
            if start != have:
                part.unlink(missing_ok=True)
                raise _Transient(f"asked for bytes from {have}, got from {start}; starting over", retry_after=0)
        else:
            have = 0  # the server ignored the range: the whole file again
            total = int(r.headers["content-length"]) if "content-length" in r.headers else None
        size = size or total
        tally.start(url, size, have)
        with open(part, "ab" if have else "wb") as f:
            for chunk in r.iter_raw():  # as it arrives: a chunk buffered to a size would be lost with the connection
                if abort.is_set():
                    raise _Aborted()
                f.write(chunk)
                tally.advance(url, len(chunk))
    if size is not None and part.stat().st_size < size:
        raise _Transient("the connection ended early")
    return size, sha256


def _published(r: httpx.Response) -> tuple[Optional[str], Optional[int]]:
    """The sha256 and size a server publishes for the file, on the response or a redirect before it."""
    sha256 = size = None
    for resp in (*r.history, r):
        tag = resp.headers.get(SHA256_HEADER, "").removeprefix("W/").strip('"').lower()
        if re.fullmatch(r"[0-9a-f]{64}", tag):
            sha256 = tag
        if resp.headers.get(SIZE_HEADER, "").isdigit():
            size = int(resp.headers[SIZE_HEADER])
    return sha256, size


def _content_range(value: str) -> tuple[int, Optional[int]]:
    """`bytes START-END/TOTAL` → (START, TOTAL or None when `*`)."""
    m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", value.strip())
    if not m:
        raise _Transient(f"a 206 without a usable Content-Range ({value!r})")
    return int(m[1]), None if m[2] == "*" else int(m[2])


def _retry_after(value: Optional[str]) -> Optional[float]:
    """Retry-After in seconds (RFC 9110: a number of seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
