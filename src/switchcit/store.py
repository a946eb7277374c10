"""The on-disk continual model: a manifest that names every live file, changed only by atomic rename.

New files always go to fresh, never-reused paths that nothing references yet; the manifest is then
replaced in one `os.replace`. A crash at any moment leaves the previous manifest and every file it
names intact; files that no manifest names are swept after the next successful commit. Writers
hold an OS advisory lock (`flock` on `.lock`), which the kernel releases when a process dies.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from .errors import SwitchcitError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
_REQUIRED_KEYS = ("format", "base_model", "encoder", "tasks", "switch")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """A store folder: read the manifest, reserve fresh paths, commit a new manifest atomically."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def read(self) -> dict:
        """The current manifest; a clear error if the store is missing, corrupt or too new."""
        if not self.exists():
            raise SwitchcitError(f"no switchcit store at {self.root}: create one with `switchcit learn --store "
                                 f"{self.root} --task NAME --data FILE.jsonl`")
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            if not isinstance(manifest, dict) or any(k not in manifest for k in _REQUIRED_KEYS):
                raise ValueError("missing keys")
        except (ValueError, UnicodeDecodeError) as exc:
            raise SwitchcitError(f"{self.manifest_path} is corrupt ({exc}): restore it from a backup or "
                                 "start a new store") from None
        if not isinstance(manifest["format"], int) or manifest["format"] > FORMAT_VERSION:
            raise SwitchcitError(f"{self.manifest_path} has format {manifest['format']}, newer than this "
                                 f"switchcit understands ({FORMAT_VERSION}): upgrade switchcit")
        return manifest

    def path(self, relative: str) -> Path:
        return self.root / relative

    def fresh(self, kind: str, name: str, suffix: str = "") -> str:
        """A new relative path `kind/name/<random><suffix>` that no manifest can name yet."""
        return f"{kind}/{name}/{uuid.uuid4().hex[:12]}{suffix}"

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive writer lock; waits (and says so) while another writer holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"switchcit: waiting for another writer of {self.root} ...", file=sys.stderr, flush=True)
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def commit(self, manifest: dict) -> None:
        """Make `manifest` the store's state in one atomic step, then sweep files it no longer names."""
        manifest = dict(manifest, format=FORMAT_VERSION, updated_at=now())
        manifest.setdefault("created_at", manifest["updated_at"])
        for relative in live_paths(manifest):
            for path in [self.path(relative), *self.path(relative).rglob("*")]:
                if path.is_file():
                    with open(path, "rb") as handle:
                        os.fsync(handle.fileno())
        staging = self.root / f".{MANIFEST}.{uuid.uuid4().hex[:8]}.tmp"
        with open(staging, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, self.manifest_path)
        _fsync_dir(self.root)
        self.sweep(manifest)

    def sweep(self, manifest: dict) -> None:
        """Delete files and folders under adapters/, switch/ and memory/ that the manifest does not name."""
        live = {self.path(p).resolve() for p in live_paths(manifest)}
        for kind in ("adapters", "switch", "memory"):
            for group in sorted(self.path(kind).glob("*")):
                for entry in sorted(group.glob("*")):
                    if entry.resolve() not in live:
                        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                if group.is_dir() and not any(group.iterdir()):
                    group.rmdir()
        for stale in self.root.glob(f".{MANIFEST}.*.tmp"):
            stale.unlink()


def live_paths(manifest: dict) -> list[str]:
    paths = [manifest["switch"]] if manifest.get("switch") else []
    for task in manifest.get("tasks", []):
        paths += [task["adapter"], task["memory"]]
    return paths
