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
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SwitchcitError

if TYPE_CHECKING:
    from .memory import TaskMemory

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"


@dataclass(frozen=True)
class TaskEntry:
    """One learned task as the manifest records it: its files and how it was trained."""

    name: str
    adapter: str  # store-relative folder of the PEFT adapter
    memory: str  # store-relative safetensors file of its features and statistics (memory.py)
    examples: int
    memory_size: int
    steps: int
    final_loss: float
    lora: dict
    learned_at: str

    @classmethod
    def from_json(cls, data: dict) -> TaskEntry:
        return cls(**{f.name: data[f.name] for f in fields(cls)})

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Manifest:
    """The store's state: base model, encoder, router, tasks in learning order and the current switch."""

    base_model: str
    base_fingerprint: dict
    encoder: str
    encoder_dim: int
    memory_fraction: float
    memory_min_per_task: int
    router: str = "mlp"  # stores written before the Gaussian switch have no router and route with the MLP
    tasks: tuple[TaskEntry, ...] = ()
    switch: str | None = None
    generation: int = 0
    created_at: str | None = None
    updated_at: str | None = None

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def with_tasks(self, tasks: list[TaskEntry], switch: str | None) -> Manifest:
        """The next generation: these tasks and this switch."""
        return replace(self, tasks=tuple(tasks), switch=switch, generation=self.generation + 1)

    def live_paths(self) -> list[str]:
        return ([self.switch] if self.switch else []) + [p for t in self.tasks for p in (t.adapter, t.memory)]

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        return cls(data["base_model"]["reference"], data["base_model"]["fingerprint"], data["encoder"]["reference"],
                   data["encoder"]["dim"], data["memory"]["fraction"], data["memory"]["min_per_task"],
                   data.get("router", "mlp"), tuple(TaskEntry.from_json(t) for t in data["tasks"]), data["switch"],
                   data.get("generation", 0), data.get("created_at"), data.get("updated_at"))

    def to_json(self) -> dict:
        return {"format": FORMAT_VERSION,
                "base_model": {"reference": self.base_model, "fingerprint": self.base_fingerprint},
                "encoder": {"reference": self.encoder, "dim": self.encoder_dim},
                "memory": {"fraction": self.memory_fraction, "min_per_task": self.memory_min_per_task},
                "router": self.router, "tasks": [t.to_json() for t in self.tasks], "switch": self.switch,
                "generation": self.generation, "created_at": self.created_at, "updated_at": self.updated_at}


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

    def read(self) -> Manifest:
        """The current manifest; a clear error if the store is missing, corrupt or too new."""
        if not self.exists():
            raise SwitchcitError(f"no switchcit store at {self.root}: create one with `switchcit learn --store "
                                 f"{self.root} --task NAME --data FILE.jsonl`")
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or "format" not in data:
                raise ValueError("missing keys")
            if isinstance(data["format"], int) and data["format"] > FORMAT_VERSION:
                raise SwitchcitError(f"{self.manifest_path} has format {data['format']}, newer than this "
                                     f"switchcit understands ({FORMAT_VERSION}): upgrade switchcit")
            return Manifest.from_json(data)
        except (ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise SwitchcitError(f"{self.manifest_path} is corrupt ({type(exc).__name__}: {exc}): restore it from "
                                 "a backup or start a new store") from None

    def memory(self, task: TaskEntry) -> TaskMemory:
        """What the store keeps of one task for routing (the one way to read it)."""
        from .memory import TaskMemory

        return TaskMemory.load(self.path(task.memory))

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

    def commit(self, manifest: Manifest) -> Manifest:
        """Make `manifest` the store's state in one atomic step, then sweep files it no longer names."""
        stamp = now()
        manifest = replace(manifest, updated_at=stamp, created_at=manifest.created_at or stamp)
        for relative in manifest.live_paths():
            for path in [self.path(relative), *self.path(relative).rglob("*")]:
                if path.is_file():
                    with open(path, "rb") as handle:
                        os.fsync(handle.fileno())
        staging = self.root / f".{MANIFEST}.{uuid.uuid4().hex[:8]}.tmp"
        with open(staging, "w", encoding="utf-8") as handle:
            json.dump(manifest.to_json(), handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, self.manifest_path)
        _fsync_dir(self.root)
        self.sweep(manifest)
        return manifest

    def sweep(self, manifest: Manifest) -> None:
        """Delete files and folders under adapters/, switch/ and memory/ that the manifest does not name."""
        live = {self.path(p).resolve() for p in manifest.live_paths()}
        for kind in ("adapters", "switch", "memory"):
            for group in sorted(self.path(kind).glob("*")):
                for entry in sorted(group.glob("*")):
                    if entry.resolve() not in live:
                        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                if group.is_dir() and not any(group.iterdir()):
                    group.rmdir()
        for stale in self.root.glob(f".{MANIFEST}.*.tmp"):
            stale.unlink()

