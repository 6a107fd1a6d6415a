"""Preparing an SSH host to run experiments: the trainer package, a Python that can run the harness, and the data,
each sent only when its content changed on the host, and each verified there before an experiment starts.

Writes only under the host's workdir; never sends anything but the trainer package and the data directory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import asyncssh

from loop.runners.ssh_host import BootstrapError, RemoteCommandError, SSHHost, last_line, q
from trainer.data import sha256_file

log = logging.getLogger(__name__)

SYNC_CACHE = ".ratchet-sha256.json"  # on the host, beside the data: (size, mtime_ns, sha256) of each file
TRAINER_STAMP = ".ratchet-hash"  # on the host, in lib/trainer: the content hash of the uploaded package


@dataclass
class BootstrapReport:
    """What preparing a host did. Sizes in bytes, times in seconds."""

    host: str
    workdir: str  # absolute, on the host
    python: str  # the interpreter the harness runs with
    trainer_uploaded: bool  # False when the host already had this trainer package
    data_dir: str = ""  # absolute, on the host
    uploaded_files: list[str] = field(default_factory=list)  # data files sent (relative to the data dir)
    uploaded_bytes: int = 0
    seconds: float = 0.0


def package_files(pkg: Path) -> list[Path]:
    """The files of a Python package that are shipped to hosts (sources and templates, no caches), sorted."""
    pkg = Path(pkg)
    return sorted(p for p in pkg.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and p.suffix not in (".pyc", ".pyo") and not p.name.startswith("."))


def package_hash(pkg: Path) -> str:
    """sha256 over the relative paths and contents of `package_files(pkg)`: changes when any file does."""
    h = hashlib.sha256()
    for p in package_files(pkg):
        h.update(p.relative_to(pkg).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


def local_hashes(data_dir: Path) -> dict[str, str]:
    """sha256 of every file of a local data dir (relative posix path → hex), cached by (size, mtime)."""
    out = {}
    for p in sorted(Path(data_dir).rglob("*")):
        if p.is_file() and not p.name.startswith(".") and ".tmp" not in p.name:
            st = p.stat()
            out[p.relative_to(data_dir).as_posix()] = _file_sha256(str(p), st.st_size, st.st_mtime_ns)
    return out


@functools.lru_cache(maxsize=None)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


# On the host, with its own python: sha256 of the listed files of a directory, cached by (size, mtime_ns)
# for files not marked `full`. Reads {"dir", "files": [[rel, full], ...]} on stdin, prints {rel: sha256}.
_REMOTE_HASH = r'''
import hashlib, json, os, sys
req = json.load(sys.stdin)
d = req["dir"]
cache_path = os.path.join(d, "%s")
try:
    cache = json.load(open(cache_path))
except Exception:
    cache = {}
out = {}
for rel, full in req["files"]:
    p = os.path.join(d, rel)
    try:
        st = os.stat(p)
    except OSError:
        continue
    key = [st.st_size, st.st_mtime_ns]
    c = cache.get(rel)
    if not full and c and c[:2] == key:
        out[rel] = c[2]
        continue
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    out[rel] = h.hexdigest()
    cache[rel] = key + [out[rel]]
if os.path.isdir(d):
    with open(cache_path + ".tmp", "w") as f:
        json.dump(cache, f)
    os.replace(cache_path + ".tmp", cache_path)
print(json.dumps(out))
''' % SYNC_CACHE


async def ensure_ready(h: SSHHost, data_dir: Optional[Path]) -> BootstrapReport:
    """Connect; upload the trainer when its hash changed; check the Python; sync and verify `data_dir`.

    Work already verified on the current connection is skipped. Raises HostUnreachable, BootstrapError.
    """
    async with h.bootstrap_lock:
        t0 = time.time()
        await ensure_python(h, await h.connection())
        report = BootstrapReport(h.name, h.workdir, h.python, h.trainer_uploaded)
        if data_dir is not None:
            key = await asyncio.get_running_loop().run_in_executor(None, sha256_file, Path(data_dir) / "manifest.json")
            if key not in h.data_ready:
                h.data_ready[key] = await _sync_data(h, Path(data_dir), report)
            report = h.data_ready[key]
        report.seconds = round(time.time() - t0, 3)
        return report


async def ensure_python(h: SSHHost, conn: asyncssh.SSHClientConnection) -> None:
    """The trainer package is current on the host and its Python can run the harness (once per connection).

    Raises BootstrapError naming the fix, HostUnreachable."""
    async with h.python_lock:
        if h.ready_conn is not conn:
            h.trainer_ok = h.python_ok = False
            h.data_ready = {}
            h.ready_conn = conn
        if not h.trainer_ok:
            wd = h.workdir
            h.workdir = last_line(await h.run(
                f"mkdir -p {q(wd)}/lib {q(wd)}/data {q(wd)}/runs && cd {q(wd)} && pwd -P"))
            h.trainer_uploaded = await _sync_trainer(h)
            h.trainer_ok = True
        if not h.python_ok:
            await h.check_python(with_trainer=True)
            h.python_ok = True


async def _sync_trainer(h: SSHHost) -> bool:
    pkg = h.runner.local_python_pkg
    want = await asyncio.get_running_loop().run_in_executor(None, package_hash, pkg)
    dest = f"{h.workdir}/lib/trainer"
    have = await h.read_from(f"{dest}/{TRAINER_STAMP}", 0)
    if have is not None and have.decode(errors="replace").strip() == want:
        return False
    tmp = f"{dest}.new-{want[:12]}"
    await h.run(f"rm -rf {q(tmp)} && mkdir -p {q(tmp)}")
    await h.put(pkg, tmp, [p.relative_to(pkg).as_posix() for p in package_files(pkg)], "the trainer package")
    await h.run(f"echo {want} > {q(tmp)}/{TRAINER_STAMP} && rm -rf {q(dest)}.old; "
                f"if [ -d {q(dest)} ]; then mv {q(dest)} {q(dest)}.old; fi; "
                f"mv {q(tmp)} {q(dest)} && rm -rf {q(dest)}.old")
    log.info("%s: trainer package uploaded (%s)", h.name, want[:12])
    return True


async def _remote_hashes(h: SSHHost, remote: str, files: list[tuple[str, bool]]) -> dict[str, str]:
    out = await h.run(f"mkdir -p {q(remote)} && {q(h.python)} -c {q(_REMOTE_HASH)}",
                      input=json.dumps({"dir": remote, "files": files}), timeout=max(h.runner.op_timeout_s, 600.0))
    return json.loads(out.strip().splitlines()[-1])


async def _sync_data(h: SSHHost, data_dir: Path, report: BootstrapReport) -> BootstrapReport:
    """Send the files whose sha256 differs on the host (the manifest last), then verify the fingerprints there."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    fingerprinted = set(manifest.get("fingerprints", {}))
    local = await asyncio.get_running_loop().run_in_executor(None, local_hashes, data_dir)
    remote = f"{h.workdir}/data/{data_dir.name}"
    rels = sorted(local, key=lambda r: (r == "manifest.json", r))
    have = await _remote_hashes(h, remote, [(r, r in fingerprinted or r == "manifest.json") for r in rels])
    todo = [r for r in rels if have.get(r) != local[r]]
    report = dataclasses.replace(report, data_dir=remote, uploaded_files=todo,
                                 uploaded_bytes=sum((data_dir / r).stat().st_size for r in todo))
    if todo:
        await h.put(data_dir, remote, todo, "data", part=True)
        check = await _remote_hashes(h, remote, [(r, True) for r in todo])
        bad = [r for r in todo if check.get(r) != local[r]]
        if bad:
            raise BootstrapError(f"{h.name}: data files arrived corrupted on the host: {', '.join(bad)}")
        log.info("%s: sent %d data files (%d bytes) to %s", h.name, len(todo), report.uploaded_bytes, remote)
    verify = f"from trainer.data import verify_fingerprints; verify_fingerprints({remote!r}); print('ok')"
    try:
        await h.run(f"PYTHONPATH={q(h.workdir + '/lib')} {q(h.python)} -P -c {q(verify)}",
                    timeout=max(h.runner.op_timeout_s, 600.0))
    except RemoteCommandError as e:
        raise BootstrapError(f"{h.name}: data on the host refused: {e}") from None
    return report
