"""Portable bundles: a store as one tar file with checksums, verified and sandboxed on import.

A bundle is what `export` writes: `checksums.json` (every other member's SHA-256), then `manifest.json`,
then the files the manifest names. `import` reads it as a stream, one buffer at a time: each file goes
straight to a staging folder beside the target while its checksum and the byte count are taken, and a
member that the manifest does not name is refused before a byte of it is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import shutil
import tarfile
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from .errors import SwitchcitError, failed_writes
from .store import MANIFEST, Manifest, NewerFormat, Store, parse_manifest

CHECKSUMS = "checksums.json"
MAX_BYTES = 8 * 2**30  # what `import` unpacks at most, counted as it reads (declared sizes are not trusted)
_BUFFER = 2**20  # bytes read and written at a time
_HEADER = 512  # a tar member's header, counted against the cap too (a bundle of countless empty members)
_HEAD_BYTES = 64 * 2**20  # most bytes of checksums.json or manifest.json, which are held in memory
# How reading a damaged or foreign file as a (compressed) tar fails.
_UNREADABLE = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_BUFFER):
            digest.update(chunk)
    return digest.hexdigest()


def export_store(root: str | Path, out: str | Path) -> dict:
    """Write the store's live files (manifest, adapters, switch, memory) and their SHA-256 to a tar file,
    streaming them (a shared lock keeps writers from changing the store meanwhile)."""
    store, out = Store(root), Path(out)
    if out.resolve() == store.root.resolve() or store.root.resolve() in out.resolve().parents:
        raise SwitchcitError(f"{out} is inside store {store.root}: write the bundle outside the store")
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    with store.lock(shared=True):  # a consistent snapshot: no learn commits while we read
        manifest = store.read()
        files = [MANIFEST, *manifest.required_files()]  # what a store needs, nothing a folder happens to hold
        with failed_writes(f"export to {out}", "free space or choose another place for the bundle; no bundle was "
                           "written"):
            checksums = {name: _sha256_file(store.path(name)) for name in files}
            total = sum(store.path(name).stat().st_size for name in files)
            _sweep_stale(out.parent, f".{out.name}.*.tmp")  # a killed export's half-written bundle
            try:
                with tarfile.open(staging, "w") as tar:
                    listing = json.dumps(checksums, indent=2).encode()
                    tar.addfile(_member(CHECKSUMS, len(listing)), io.BytesIO(listing))
                    for name in files:
                        with open(store.path(name), "rb") as handle:
                            tar.addfile(_member(name, os.fstat(handle.fileno()).st_size), handle)
                os.replace(staging, out)
            finally:
                staging.unlink(missing_ok=True)
    return {"files": len(files), "bytes": total, "tasks": len(manifest.tasks)}


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, 0o644
    return info


def _sweep_stale(folder: Path, pattern: str) -> None:
    """Remove what a killed export or import of the same target left, by the names only they use."""
    for stale in folder.glob(pattern):
        if stale.is_symlink():
            continue
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def _safe_name(name: str) -> bool:
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name


class _Unpacking:
    """One pass over a bundle's members into a staging folder: the checksum list and the manifest first
    (held in memory), then each file the manifest names, streamed to disk under the byte cap."""

    def __init__(self, bundle: Path, staging: Path, max_bytes: int):
        self.bundle, self.staging, self.max_bytes = bundle, staging, max_bytes
        self.total = 0
        self.heads: dict[str, bytes] = {}  # checksums.json and manifest.json, as read
        self.checksums: dict[str, str] | None = None
        self.manifest: Manifest | None = None
        self.required: set[str] = set()  # every file the manifest names (Manifest.required_files)
        self.written: set[str] = set()

    def refuse(self, why: str) -> SwitchcitError:
        return SwitchcitError(f"bundle {self.bundle} {why}: refusing it")

    def read(self, source: io.BufferedReader, size: int) -> bytes:
        try:
            return source.read(size)
        except _UNREADABLE as exc:
            raise _unreadable(self.bundle, exc) from None

    def count(self, size: int) -> None:
        self.total += size
        if self.total > self.max_bytes:
            raise SwitchcitError(f"bundle {self.bundle} unpacks to more than {self.max_bytes} bytes: refusing it "
                                 "(raise max_bytes, --max-bytes, if you trust it)")

    def member(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        self.count(_HEADER)
        if m.isdir() and _safe_name(m.name):
            return
        if not m.isreg() or m.issparse() or not _safe_name(m.name):
            raise self.refuse(f"holds '{m.name}': a link, a device, a sparse file or a path outside the store, not "
                              "a plain file")
        if m.name in self.heads or m.name in self.written:
            raise self.refuse(f"holds '{m.name}' twice")
        source = tar.extractfile(m)
        if m.name in (CHECKSUMS, MANIFEST) and self.manifest is None:
            self.heads[m.name] = data = self.read(source, min(_HEAD_BYTES, self.max_bytes - self.total) + 1)
            self.count(len(data))
            if len(data) > _HEAD_BYTES:
                raise self.refuse(f"holds a {m.name} of more than {_HEAD_BYTES} bytes")
            return
        self.check_heads()
        if m.name not in self.checksums:
            raise self.refuse(f"holds '{m.name}', which its {CHECKSUMS} does not list")
        if m.name not in self.required:
            raise self.refuse(f"holds '{m.name}', which its manifest does not name")
        target = self.staging / m.name
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with open(target, "xb") as out:
            while chunk := self.read(source, min(_BUFFER, self.max_bytes - self.total + 1)):
                self.count(len(chunk))
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != self.checksums[m.name]:
            raise self.refuse(f"is damaged or tampered: checksum of {m.name} does not match")
        self.written.add(m.name)

    def check_heads(self) -> None:
        """Parse the checksum list and the manifest, once, before the first file they govern."""
        if self.manifest is not None:
            return
        try:
            checksums = json.loads(self.heads[CHECKSUMS])
            if not isinstance(checksums, dict) or not all(isinstance(v, str) for v in checksums.values()):
                raise ValueError("not a map of names to SHA-256")
        except (KeyError, ValueError, RecursionError):
            raise SwitchcitError(f"bundle {self.bundle} has no valid {CHECKSUMS} at its start: use `switchcit "
                                 "export`") from None
        if MANIFEST not in self.heads:
            raise self.refuse(f"has no {MANIFEST} before its files (`switchcit export` writes it first)")
        if hashlib.sha256(self.heads[MANIFEST]).hexdigest() != checksums.get(MANIFEST):
            raise self.refuse(f"is damaged or tampered: checksum of {MANIFEST} does not match")
        try:
            self.manifest = parse_manifest(self.heads[MANIFEST].decode("utf-8"))
        except NewerFormat as exc:
            raise SwitchcitError(f"bundle {self.bundle}: its {MANIFEST} {exc}") from None
        except ValueError as exc:
            raise SwitchcitError(f"bundle {self.bundle}: its {MANIFEST} is corrupt ({exc}): refusing it") from None
        self.checksums = checksums
        self.required = set(self.manifest.required_files())
        (self.staging / MANIFEST).parent.mkdir(parents=True, exist_ok=True)
        (self.staging / MANIFEST).write_bytes(self.heads[MANIFEST])

    def finish(self) -> Manifest:
        """The manifest, once every listed file came and every file the manifest requires is there."""
        self.check_heads()
        if set(self.checksums) != {MANIFEST, *self.written}:
            raise self.refuse(f"does not match its {CHECKSUMS} (extra or missing files)")
        missing = Store(self.staging).missing(self.manifest)
        if missing:
            raise self.refuse(f"lacks {missing}, which its manifest names")
        return self.manifest


def _unreadable(bundle: Path, exc: BaseException) -> SwitchcitError:
    why = (str(exc).splitlines() or [type(exc).__name__])[0].rstrip(":")  # tarfile lists each method it tried
    return SwitchcitError(f"{bundle} is not a readable tar bundle ({why}): give a bundle made by `switchcit export`")


def _members(bundle: Path) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """The bundle's members as they come in the stream; a damaged or foreign file is one line."""
    try:
        tar = tarfile.open(bundle, "r")  # noqa: SIM115 - closed below
    except _UNREADABLE as exc:
        raise _unreadable(bundle, exc) from None
    with tar:
        while True:
            try:
                member = tar.next()
            except _UNREADABLE as exc:
                raise _unreadable(bundle, exc) from None
            if member is None:
                return
            yield tar, member


def import_bundle(bundle: str | Path, root: str | Path, max_bytes: int = MAX_BYTES) -> Manifest:
    """Unpack a bundle into a new store folder; refuse links, escaping paths, files the manifest does not name,
    more than `max_bytes`, and any checksum mismatch. Nothing is left behind when it is refused."""
    bundle, root = Path(bundle), Path(root)
    if not bundle.is_file():
        raise SwitchcitError(f"bundle not found: {bundle}")
    if root.exists() and any(root.iterdir()):
        raise SwitchcitError(f"{root} is not empty: import into a new folder")
    _sweep_stale(root.parent, f".{root.name}.import-*")  # a killed import's half-unpacked store
    staging = root.with_name(f".{root.name}.import-{uuid.uuid4().hex[:8]}")
    unpacking = _Unpacking(bundle, staging, max_bytes)
    try:
        with failed_writes(f"import into {root}", "free space or choose another folder; nothing was imported"):
            for tar, member in _members(bundle):
                unpacking.member(tar, member)
            manifest = unpacking.finish()
            if root.exists():
                root.rmdir()
            os.rename(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
