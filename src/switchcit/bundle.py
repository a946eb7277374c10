"""Portable bundles: a store as one tar file with checksums, verified and sandboxed on import."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import uuid
from pathlib import Path, PurePosixPath

from .errors import SwitchcitError
from .store import MANIFEST, Store

CHECKSUMS = "checksums.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export_store(root: str | Path, out: str | Path) -> dict:
    """Write the store's live files (manifest, adapters, switch, memory) and their SHA-256 to a tar file."""
    store, out = Store(root), Path(out)
    if out.resolve() == store.root.resolve() or store.root.resolve() in out.resolve().parents:
        raise SwitchcitError(f"{out} is inside store {store.root}: write the bundle outside the store")
    with store.lock(shared=True):  # a consistent snapshot: no learn commits while we read
        manifest = store.read()
        files = [MANIFEST]
        for relative in manifest.live_paths():
            path = store.path(relative)
            files += [str(p.relative_to(store.root)) for p in sorted(path.rglob("*")) if p.is_file()] \
                if path.is_dir() else [relative]
        contents = {name: store.path(name).read_bytes() for name in files}
    checksums = {name: _sha256(data) for name, data in contents.items()}
    _sweep_stale(out.parent, f".{out.name}.*.tmp")  # a killed export's half-written bundle
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tarfile.open(staging, "w") as tar:
            for name, data in [(CHECKSUMS, json.dumps(checksums, indent=2).encode()), *contents.items()]:
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)
    return {"files": len(contents), "bytes": sum(len(d) for d in contents.values()), "tasks": len(manifest.tasks)}


def _sweep_stale(folder: Path, pattern: str) -> None:
    """Remove what a killed export or import of the same target left, by the names only they use."""
    for stale in folder.glob(pattern):
        if stale.is_symlink():
            continue
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def _safe_name(name: str) -> bool:
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name


MAX_BYTES = 8 * 2**30  # what `import` unpacks at most, counted as it reads (declared sizes are not trusted)


def _read_members(tar: tarfile.TarFile, bundle: Path, max_bytes: int) -> dict[str, bytes]:
    """Every file of the bundle, read in a stream; refuse links, devices, sparse or repeated members, escaping
    paths, and more than `max_bytes` in all."""
    files: dict[str, bytes] = {}
    total = 0
    for m in tar:
        if m.isdir() and _safe_name(m.name):
            continue
        if not m.isreg() or m.issparse() or not _safe_name(m.name):
            raise SwitchcitError(f"bundle {bundle} holds '{m.name}': a link, a device, a sparse file or a path "
                                 "outside the store, not a plain file: refusing it")
        if m.name in files:
            raise SwitchcitError(f"bundle {bundle} holds '{m.name}' twice: refusing it")
        data = tar.extractfile(m).read(max_bytes - total + 1)
        total += len(data)
        if total > max_bytes:
            raise SwitchcitError(f"bundle {bundle} unpacks to more than {max_bytes} bytes: refusing it (raise "
                                 "max_bytes, --max-bytes, if you trust it)")
        files[m.name] = data
    return files


def import_bundle(bundle: str | Path, root: str | Path, max_bytes: int = MAX_BYTES) -> dict:
    """Unpack a bundle into a new store folder; refuse links, escaping paths, and any checksum mismatch."""
    bundle, root = Path(bundle), Path(root)
    if not bundle.is_file():
        raise SwitchcitError(f"bundle not found: {bundle}")
    if root.exists() and any(root.iterdir()):
        raise SwitchcitError(f"{root} is not empty: import into a new folder")
    try:
        with tarfile.open(bundle, "r") as tar:
            files = _read_members(tar, bundle, max_bytes)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise SwitchcitError(f"{bundle} is not a readable tar bundle ({exc})") from None
    try:
        checksums = json.loads(files.pop(CHECKSUMS))
        if not isinstance(checksums, dict) or not all(isinstance(v, str) for v in checksums.values()):
            raise ValueError("not a map of names to SHA-256")
    except (KeyError, ValueError, RecursionError):
        raise SwitchcitError(f"bundle {bundle} has no valid {CHECKSUMS}: use `switchcit export`") from None
    if set(files) != set(checksums):
        raise SwitchcitError(f"bundle {bundle} does not match its checksum list (extra or missing files): refusing it")
    for name, data in files.items():
        if _sha256(data) != checksums[name]:
            raise SwitchcitError(f"bundle {bundle} is damaged or tampered: checksum of {name} does not match")
    _sweep_stale(root.parent, f".{root.name}.import-*")  # a killed import's half-unpacked store
    staging = root.with_name(f".{root.name}.import-{uuid.uuid4().hex[:8]}")
    try:
        for name, data in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        manifest = Store(staging).read()
        missing = [p for p in manifest.live_paths() if not (staging / p).exists()]
        if missing:
            raise SwitchcitError(f"bundle {bundle} lacks files its manifest names ({missing[0]}): refusing it")
        if root.exists():
            root.rmdir()
        os.rename(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
