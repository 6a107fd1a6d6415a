"""loop.packs against real git: the packs it writes and merges pass `git verify-pack`, a merge copies whole
objects only (a pack git deltified is refused and left as it was), and tiers bound the number of packs."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from loop import packs


def git(repo: Path, *args: str, input: bytes | None = None) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, input=input
                          ).stdout.decode().strip()


def blob(text: str) -> tuple[int, bytes, bytes]:
    raw = text.encode()
    return 3, raw, hashlib.sha1(b"blob %d\0" % len(raw) + raw).digest()


@pytest.fixture
def repo(tmp_path) -> Path:
    subprocess.run(["git", "init", "-q", str(tmp_path / "r")], check=True)
    return tmp_path / "r"


def test_a_written_pack_is_what_git_reads_and_a_repeated_object_is_written_once(repo):
    pack_dir = str(repo / ".git" / "objects" / "pack")
    texts = ["x = 1\n" * 3000, "é ✓\n", ""]  # a large, a non-ASCII and an empty blob
    base, count = packs.write_pack(pack_dir, [blob(t) for t in texts] + [blob(texts[0])])
    assert count == 3
    git(repo, "verify-pack", base + ".idx")
    for t in texts:
        sha = blob(t)[2].hex()
        assert git(repo, "cat-file", "-p", sha) == t.strip("\n")
        assert git(repo, "hash-object", "--stdin", input=t.encode()) == sha
    assert [e[0] for e in packs.read_index(base + ".idx")] == sorted(blob(t)[2] for t in texts)


def test_merging_copies_every_object_once_and_refuses_a_deltified_pack(repo):
    pack_dir = str(repo / ".git" / "objects" / "pack")
    a, _ = packs.write_pack(pack_dir, [blob("one\n"), blob("two\n")])
    b, _ = packs.write_pack(pack_dir, [blob("two\n"), blob("three\n")])
    merged, count = packs.merge_packs(pack_dir, [a, b])
    assert count == 3
    for base in (a, b):
        packs.remove_pack(base)
    git(repo, "verify-pack", merged + ".idx")
    assert [git(repo, "cat-file", "-p", blob(t)[2].hex()) for t in ("one\n", "two\n", "three\n")] == \
        ["one", "two", "three"]

    for i in range(3):  # similar files, committed and repacked by git: its pack holds deltas
        (repo / "f.txt").write_text("".join(f"line {j}\n" for j in range(500)) + f"change {i}\n")
        git(repo, "add", "f.txt")
        git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", f"c{i}")
    git(repo, "repack", "-a", "-d", "-q")
    theirs = [str(p.with_suffix("")) for p in Path(pack_dir).glob("*.pack")]
    with pytest.raises(ValueError, match="delta"):
        packs.merge_packs(pack_dir, theirs)
    assert not list(Path(pack_dir).glob("tmp_*"))  # the half-written merge is removed

    tiers = packs.PackTiers(pack_dir)
    for base in theirs * packs.FANOUT:
        tiers.add(base, 1)
    tiers.merge_due()
    assert tiers.errors and all(Path(p + ".pack").exists() for p in theirs)  # left as they were
    git(repo, "fsck")


def test_tiers_keep_the_number_of_packs_logarithmic(repo, monkeypatch):
    monkeypatch.setattr(packs, "FANOUT", 4)
    assert [packs.tier(n) for n in (1, 15, 16, 255, 256, 65_536)] == [0, 0, 1, 1, 2, 4]
    pack_dir = str(repo / ".git" / "objects" / "pack")
    tiers = packs.PackTiers(pack_dir)
    for i in range(64):  # 64 packs of 4 objects (tier 0)
        base, count = packs.write_pack(pack_dir, [blob(f"{i}:{k}\n") for k in range(4)])
        if tiers.add(base, count):
            tiers.merge_due()
    on_disk = sorted(str(p.with_suffix("")) for p in Path(pack_dir).glob("*.pack"))
    assert on_disk == sorted(tiers.packs()) and len(on_disk) <= 3 * 3 and not tiers.errors
    assert sum(int(git(repo, "show-index", input=Path(p + ".idx").read_bytes()).count("\n")) + 1
               for p in on_disk) == 256
    git(repo, "fsck")
