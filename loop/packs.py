"""Git pack files for a fleet's experiment commits: one pack per round of new experiments instead of three
loose objects each, and a tiered merge that keeps the number of packs small.

A loose object is a file created and renamed into place: at 100 experiments a second, four file creations
per experiment (blob, tree, commit, ref) were a quarter of the engine's CPU, most of it in the kernel. A
round's objects written as one pack cost two file creations (pack, index) for all of them.

Formats (git's Documentation/gitformat-pack.txt): pack version 2 with whole objects only (no deltas:
`git gc` deltifies later), index version 2. No fsync, as for git's own loose objects by default.
"""

from __future__ import annotations

import binascii
import hashlib
import logging
import os
import struct
import tempfile
import threading
import zlib
from pathlib import Path

log = logging.getLogger(__name__)

# Object type numbers in a pack entry's header (gitformat-pack: OBJ_COMMIT 1, OBJ_TREE 2, OBJ_BLOB 3, OBJ_TAG 4;
# 6 and 7 are deltas, which this module neither writes nor copies).
WHOLE_TYPES = frozenset((1, 2, 3, 4))
FANOUT = 16  # packs of one tier merged at once; a tier spans a factor of 16 in object count
MAX_TIER = 4  # packs of 16**4 = 65 536 objects or more (about 150 MB of experiments) are left for `git gc`
MAX_PACK_BYTES = 2**31 - 1  # index v2's 31-bit offsets; a larger pack would need its 64-bit offset table


def _entry_header(type_num: int, size: int) -> bytes:
    """A pack entry's header: type and size in git's little-endian base-128 varint (gitformat-pack)."""
    byte, size = (type_num << 4) | (size & 0x0F), size >> 4
    out = bytearray()
    while size:
        out.append(byte | 0x80)
        byte, size = size & 0x7F, size >> 7
    out.append(byte)
    return bytes(out)


def _index_bytes(entries: list[tuple[bytes, int, int]], pack_sha: bytes) -> bytes:
    """Index v2 of `entries` (sha 20 bytes, crc32 of the entry's bytes, offset in the pack), sorted by sha."""
    entries = sorted(entries)
    counts = [0] * 256
    for sha, _, _ in entries:
        counts[sha[0]] += 1
    fanout, total = [], 0
    for c in counts:
        total += c
        fanout.append(total)
    n = len(entries)
    body = b"".join((b"\377tOc", struct.pack(">I", 2), struct.pack(">256I", *fanout),
                     b"".join(e[0] for e in entries), struct.pack(f">{n}I", *(e[1] for e in entries)),
                     struct.pack(f">{n}I", *(e[2] for e in entries)), pack_sha))
    return body + hashlib.sha1(body).digest()


def read_index(idx_path: str) -> list[tuple[bytes, int, int]]:
    """(sha, crc32, offset) of every object in a version-2 pack index, in sha order.
    Raises ValueError for another version or a pack over 2 GiB (64-bit offsets), OSError when unreadable."""
    data = Path(idx_path).read_bytes()
    if data[:8] != b"\377tOc" + struct.pack(">I", 2):
        raise ValueError(f"{idx_path}: not a version 2 pack index")
    n = struct.unpack_from(">I", data, 8 + 255 * 4)[0]
    base = 8 + 256 * 4
    shas = [data[base + 20 * i: base + 20 * i + 20] for i in range(n)]
    crcs = struct.unpack_from(f">{n}I", data, base + 20 * n)
    offsets = struct.unpack_from(f">{n}I", data, base + 24 * n)
    if any(o & 0x80000000 for o in offsets):
        raise ValueError(f"{idx_path}: 64-bit offsets")
    return list(zip(shas, crcs, offsets))


def _install(pack_dir: str, pack_path: str, idx: bytes, pack_sha: bytes) -> str:
    """Move a finished temporary pack into place as pack-<sha>.pack, then write its index (readers, git and
    dulwich, only use a pack once its .idx exists). Returns the basename (path without extension)."""
    name = os.path.join(pack_dir, f"pack-{pack_sha.hex()}")
    os.chmod(pack_path, 0o444)
    os.replace(pack_path, name + ".pack")
    fd, tmp = tempfile.mkstemp(dir=pack_dir, prefix="tmp_idx_")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(idx)
        os.chmod(tmp, 0o444)
        os.replace(tmp, name + ".idx")
    except BaseException:
        _unlink(tmp)
        raise
    return name


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_pack(pack_dir: str, objects: list[tuple[int, bytes, bytes]], level: int = 1) -> tuple[str, int]:
    """Write `objects` (type number, raw content, 20-byte sha; a repeated sha is written once) as one pack with
    its index under `pack_dir` (a repository's objects/pack). zlib `level` as git's pack.compression.
    Returns (basename without extension, objects written). Raises OSError (nothing is left in place then)."""
    parts, entries, seen, offset = [b"PACK"], [], set(), 12
    for type_num, raw, sha in objects:
        if sha in seen:
            continue
        seen.add(sha)
        data = _entry_header(type_num, len(raw)) + zlib.compress(raw, level)
        entries.append((sha, binascii.crc32(data), offset))
        parts.append(data)
        offset += len(data)
    parts.insert(1, struct.pack(">II", 2, len(entries)))
    body = b"".join(parts)
    pack_sha = hashlib.sha1(body).digest()
    os.makedirs(pack_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=pack_dir, prefix="tmp_pack_")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.write(pack_sha)
        return _install(pack_dir, tmp, _index_bytes(entries, pack_sha), pack_sha), len(entries)
    except BaseException:
        _unlink(tmp)
        raise


def merge_packs(pack_dir: str, basenames: list[str]) -> tuple[str, int]:
    """One pack holding every object of the packs `basenames` (paths without extension), their entries copied
    as they are (no decompression: each holds a whole object, so it can move to any offset). The sources are
    left in place (the caller removes them once the merged pack is in place). Returns (basename, objects).
    Raises ValueError when a source holds a delta or the result would pass 2 GiB, OSError when unreadable."""
    plan, seen, size = [], set(), 12  # the indexes first: the header's count and the size are known up front
    for base in basenames:
        index = sorted(read_index(base + ".idx"), key=lambda e: e[2])
        ends = [e[2] for e in index[1:]] + [os.path.getsize(base + ".pack") - 20]
        copies = [(sha, crc, start, end) for (sha, crc, start), end in zip(index, ends) if sha not in seen]
        seen.update(sha for sha, _, _, _ in copies)
        size += sum(end - start for _, _, start, end in copies)
        plan.append((base, copies))
    if size > MAX_PACK_BYTES:
        raise ValueError("a merged pack over 2 GiB needs 64-bit index offsets")
    header = b"PACK" + struct.pack(">II", 2, len(seen))
    h, entries, offset = hashlib.sha1(header), [], len(header)
    fd, tmp = tempfile.mkstemp(dir=pack_dir, prefix="tmp_pack_")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(header)
            for base, copies in plan:
                data = Path(base + ".pack").read_bytes()
                for sha, crc, start, end in copies:
                    if (data[start] >> 4) & 7 not in WHOLE_TYPES:
                        raise ValueError(f"{base}.pack holds a delta; only whole objects are copied")
                    entry = data[start:end]
                    out.write(entry)
                    h.update(entry)
                    entries.append((sha, crc, offset))
                    offset += end - start
            pack_sha = h.digest()
            out.write(pack_sha)
        return _install(pack_dir, tmp, _index_bytes(entries, pack_sha), pack_sha), len(entries)
    except BaseException:
        _unlink(tmp)
        raise


def remove_pack(basename: str) -> None:
    """Delete a pack: its index first, so no reader finds an index whose pack is gone for good."""
    for ext in (".idx", ".pack"):
        _unlink(basename + ext)


def tier(count: int) -> int:
    """A pack's tier: floor(log16(objects)); packs of one tier are merged FANOUT at a time."""
    return max(0, (count.bit_length() - 1) // 4)


class PackTiers:
    """The packs this process wrote, by tier, and the merges due: FANOUT packs of one tier become one pack of
    the next, so there are at most FANOUT - 1 per tier (below MAX_TIER) and each object is copied about once
    per tier, a few times in all. Packs written by another process, or by `git gc`, are not touched.
    Thread-safe: the engine adds packs; `merge_due` runs on a background thread."""

    def __init__(self, pack_dir: str):
        self.pack_dir = pack_dir
        self._lock = threading.Lock()
        self._tiers: dict[int, list[str]] = {}
        self.merges = 0
        self.errors: list[str] = []  # merge failures (the packs stay as they are; nothing is lost)

    def add(self, basename: str, count: int) -> bool:
        """Note a pack of `count` objects. Returns whether a merge is now due."""
        with self._lock:
            packs = self._tiers.setdefault(tier(count), [])
            packs.append(basename)
            return tier(count) < MAX_TIER and len(packs) >= FANOUT

    def packs(self) -> list[str]:
        """Every pack noted and not merged away (basenames)."""
        with self._lock:
            return [b for packs in self._tiers.values() for b in packs]

    def merge_due(self) -> None:
        """Merge full tiers until none is full (a merge can fill the next tier). A failed merge is noted in
        `errors` and its packs left as they were."""
        while True:
            with self._lock:
                full = next((t for t in sorted(self._tiers) if t < MAX_TIER and len(self._tiers[t]) >= FANOUT), None)
                if full is None:
                    return
                group = self._tiers[full][:FANOUT]
                del self._tiers[full][:FANOUT]
            try:
                merged, count = merge_packs(self.pack_dir, group)
            except (OSError, ValueError) as e:
                log.warning("merging %d packs failed (they stay as they are): %s", len(group), e)
                self.errors.append(f"{e}")
                continue  # the group stays on disk, no longer tracked: never retried in a loop
            for base in group:
                remove_pack(base)
            self.merges += 1
            self.add(merged, count)
