"""The on-disk continual model: a manifest that names every live file, changed only by atomic rename.

New files always go to fresh, never-reused paths that nothing references yet; the manifest is then
replaced in one `os.replace`. A crash at any moment leaves the previous manifest and every file it
names intact; files that no manifest names are swept after the next successful commit. Writers
hold an OS advisory lock (`flock` on `.lock`), which the kernel releases when a process dies.

Besides what the manifest names, a task has at most two folders keyed by its name, both removed by
`forget`: `.checkpoints/<task>/` (the trainer's checkpoints of a learn not yet committed, owned by one
process at a time through its own lock) and `logs/<task>/`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import MISSING, asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING

from .errors import SwitchcitError
from .switch import ROUTERS

if TYPE_CHECKING:
    from .memory import TaskMemory

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
KINDS = ("adapters", "switch", "memory")
CHECKPOINTS = ".checkpoints"  # .checkpoints/<task>/<run key>/: a learn's trainer checkpoints until its commit
LOGS = "logs"  # logs/<task>/: a learn's jsonl and tensorboard logs (unless --log-dir says elsewhere)
# The files a manifest's folders must hold: what PEFT's save_pretrained and the switches' save write.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
SWITCH_FILES = ("switch.json", "switch.safetensors")
# Every path a manifest may name, as `fresh` makes them: nothing absolute, no '..', nothing outside its kind.
_FRESH = r"[0-9a-f]{12}"
_PATHS = {"adapter": re.compile(rf"adapters/(?P<name>[^/]+)/{_FRESH}"),
          "memory": re.compile(rf"memory/(?P<name>[^/]+)/{_FRESH}\.safetensors"),
          "switch": re.compile(rf"switch/v[0-9]+/{_FRESH}")}


_RUN = re.compile(r"[0-9a-f]{16}")  # a run key (training.run_key): a folder name under .checkpoints/<task>/
_ENTRY_TYPES = {"examples": int, "memory_size": int, "steps": int, "final_loss": (int, float), "lora": dict,
                "eval_loss": (int, float, type(None)), "run": (str, type(None))}


def _checked(entry: TaskEntry, index: int) -> TaskEntry:
    """The entry, if its types, name and paths are what switchcit writes; else ValueError naming the field."""
    from .data import check_task_name

    for f in fields(entry):
        value = getattr(entry, f.name)
        if isinstance(value, bool) or not isinstance(value, _ENTRY_TYPES.get(f.name, str)):
            raise ValueError(f"tasks[{index}].{f.name} has the wrong type")
    try:
        check_task_name(entry.name)
    except SwitchcitError as exc:
        raise ValueError(f"tasks[{index}].name: {exc}") from None
    for field_name in ("adapter", "memory"):
        match = _PATHS[field_name].fullmatch(getattr(entry, field_name))
        if not match or match["name"] != entry.name:
            raise ValueError(f"tasks[{index}].{field_name} {getattr(entry, field_name)!r} is not a path of this "
                             "task inside the store")
    if entry.run is not None and not _RUN.fullmatch(entry.run):
        raise ValueError(f"tasks[{index}].run {entry.run!r} is not a run key")
    return entry


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
    eval_loss: float | None = None  # on the held-out data, when learn was given some
    run: str | None = None  # the run key of the learn that made it: its checkpoints go at the next commit

    @classmethod
    def from_json(cls, data: dict) -> TaskEntry:  # checked by Manifest.from_json
        return cls(**{f.name: data[f.name] if f.default is MISSING else data.get(f.name, f.default)
                      for f in fields(cls)})

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

    def refuse_mismatch(self, root: Path, encoder: str | None, router: str | None) -> None:
        """A store routes with one encoder and one router for good: asking for others is one line."""
        for asked, stored, what in ((encoder, self.encoder, "encoder"), (router, self.router, "router")):
            if asked and asked != stored:
                raise SwitchcitError(f"store {root} routes with {what} '{stored}', not '{asked}': keep its {what} "
                                     "or learn the tasks into a new store")

    def with_tasks(self, tasks: list[TaskEntry], switch: str | None) -> Manifest:
        """The next generation: these tasks and this switch."""
        return replace(self, tasks=tuple(tasks), switch=switch, generation=self.generation + 1)

    def live_paths(self) -> list[str]:
        return ([self.switch] if self.switch else []) + [p for t in self.tasks for p in (t.adapter, t.memory)]

    def required_files(self) -> list[str]:
        """Every file the store must hold for this manifest: the switch's, each adapter's and each memory."""
        switch = [f"{self.switch}/{name}" for name in SWITCH_FILES] if self.switch else []
        return switch + [p for t in self.tasks for p in (*(f"{t.adapter}/{name}" for name in ADAPTER_FILES),
                                                           t.memory)]

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        """The manifest of a parsed manifest.json; ValueError or KeyError naming the first bad field."""
        if not isinstance(data.get("tasks"), list):
            raise ValueError("tasks is not a list")
        tasks = tuple(_checked(TaskEntry.from_json(t), i) for i, t in enumerate(data["tasks"]))
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks names a task twice ({sorted({n for n in names if names.count(n) > 1})})")
        fields_ = {"base_model.reference": (data["base_model"]["reference"], str),
                   "base_model.fingerprint": (data["base_model"]["fingerprint"], dict),
                   "encoder.reference": (data["encoder"]["reference"], str),
                   "encoder.dim": (data["encoder"]["dim"], int),
                   "memory.fraction": (data["memory"]["fraction"], (int, float)),
                   "memory.min_per_task": (data["memory"]["min_per_task"], int),
                   "generation": (data.get("generation", 0), int), "router": (data.get("router", "mlp"), str)}
        for name, (value, kind) in fields_.items():
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"{name} has the wrong type")
        if data.get("router", "mlp") not in ROUTERS:
            raise ValueError(f"router {data['router']!r} is none of {', '.join(ROUTERS)}")
        switch = data["switch"]
        if switch is not None and not (isinstance(switch, str) and _PATHS["switch"].fullmatch(switch)):
            raise ValueError(f"switch {switch!r} is not a switch path inside the store")
        if bool(switch) != bool(tasks):
            raise ValueError("switch must be set exactly when tasks are")
        return cls(data["base_model"]["reference"], data["base_model"]["fingerprint"], data["encoder"]["reference"],
                   data["encoder"]["dim"], data["memory"]["fraction"], data["memory"]["min_per_task"],
                   data.get("router", "mlp"), tasks, switch, data.get("generation", 0), data.get("created_at"),
                   data.get("updated_at"))

    def to_json(self) -> dict:
        return {"format": FORMAT_VERSION,
                "base_model": {"reference": self.base_model, "fingerprint": self.base_fingerprint},
                "encoder": {"reference": self.encoder, "dim": self.encoder_dim},
                "memory": {"fraction": self.memory_fraction, "min_per_task": self.memory_min_per_task},
                "router": self.router, "tasks": [t.to_json() for t in self.tasks], "switch": self.switch,
                "generation": self.generation, "created_at": self.created_at, "updated_at": self.updated_at}


class NewerFormat(ValueError):
    """A manifest written by a newer switchcit."""


def parse_manifest(text: str) -> Manifest:
    """The Manifest of a manifest.json's text; ValueError naming the first thing wrong (NewerFormat if it is
    a later format than this switchcit reads)."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or "format" not in data:
            raise ValueError("missing keys")
        if not isinstance(data["format"], int) or isinstance(data["format"], bool):
            raise ValueError(f"format {data['format']!r} is not a whole number")
        if data["format"] > FORMAT_VERSION:
            raise NewerFormat(f"has format {data['format']}, newer than this switchcit understands "
                              f"({FORMAT_VERSION}): upgrade switchcit")
        return Manifest.from_json(data)
    except NewerFormat:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ValueError(f"missing field {exc}" if isinstance(exc, KeyError) else str(exc) or type(exc).__name__
                         ) from None


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
        self._made: list[str] | None = None  # fresh paths handed out during a change, until its commit
        if self.root.exists() and not self.root.is_dir():
            raise SwitchcitError(f"{self.root} is a file, not a store folder: give a folder")

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def read(self) -> Manifest:
        """The current manifest; a clear error if the store is missing, corrupt, too new, or lacks a file it
        names (the one check of the store's shape, so every command refuses a damaged store when it opens it)."""
        if not self.exists():
            raise SwitchcitError(f"no switchcit store at {self.root}: create one with `switchcit learn --store "
                                 f"{self.root} --task NAME --data FILE.jsonl`")
        manifest = self._parse()
        missing = self.missing(manifest)
        if missing and (again := self._parse()) != manifest:  # a writer committed meanwhile: check its state
            manifest, missing = again, self.missing(again)
        if missing:
            raise SwitchcitError(f"store {self.root} lacks {missing}, which its manifest names: restore it from a "
                                 "backup (or an exported bundle)")
        return manifest

    def _parse(self) -> Manifest:
        try:
            return parse_manifest(self.manifest_path.read_text(encoding="utf-8"))
        except NewerFormat as exc:
            raise SwitchcitError(f"{self.manifest_path} {exc}") from None
        except (ValueError, OSError) as exc:
            raise SwitchcitError(f"{self.manifest_path} is corrupt ({exc}): restore it from a backup or start a "
                                 "new store") from None

    def missing(self, manifest: Manifest) -> str | None:
        """The first file `manifest` requires that is not a file in this store, if any."""
        return next((f for f in manifest.required_files() if not self.path(f).is_file()), None)

    def memory(self, task: TaskEntry) -> TaskMemory:
        """What the store keeps of one task for routing (the one way to read it)."""
        from .memory import TaskMemory

        return TaskMemory.load(self.path(task.memory))

    def path(self, relative: str) -> Path:
        """A path inside the store, reached without following a link: switchcit never reads, writes or
        deletes through a link placed in a store, which could point anywhere."""
        root = Path(os.path.normpath(self.root))
        path = Path(os.path.normpath(root / relative))
        if root not in path.parents:
            raise SwitchcitError(f"{relative!r} is not a path inside store {self.root}: refusing it")
        for part in [path, *path.parents]:
            if part == root:
                break
            if part.is_symlink():
                raise SwitchcitError(f"store {self.root} has a link at {part}: switchcit follows no links inside a "
                                     "store; replace it with the folder or file itself")
        return path

    def fresh(self, kind: str, name: str, suffix: str = "") -> str:
        """A new relative path `kind/name/<random><suffix>` that no manifest can name yet."""
        relative = f"{kind}/{name}/{uuid.uuid4().hex[:12]}{suffix}"
        if self._made is not None:
            self._made.append(relative)
        return relative

    @contextmanager
    def change(self, create: bool = False) -> Iterator[None]:
        """A change of the store under the writer lock: if it fails before its commit, the files it wrote at
        fresh paths go again, so a failed change (a full disk) leaves the store as it was."""
        with self.lock(create=create):
            self._made = []
            try:
                yield
            except BaseException:
                for relative in self._made:  # not yet named by any manifest: the commit did not happen
                    path = self.path(relative)
                    if _real_dir(path):
                        shutil.rmtree(path)
                    elif path.is_file():
                        path.unlink()
                    with suppress(OSError):
                        path.parent.rmdir()  # the task's or generation's folder, when it was made for them
                raise
            finally:
                self._made = None

    @contextmanager
    def lock(self, create: bool = False, shared: bool = False) -> Iterator[None]:
        """Exclusive writer lock, or a `shared` one for a reader that needs a consistent snapshot (export:
        it works on a read-only store too); waits (and says so) while a writer holds it. Only `create`
        makes the folder: forgetting in or exporting a store that is not there must not create one."""
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.exists():
            self.read()  # the one-line "no switchcit store" error
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            handle = open(self.root / LOCK, "a+")  # noqa: SIM115 - closed below
        except OSError as exc:
            if not shared or exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            yield  # a read-only store has no writer to wait for
            return
        with handle:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"switchcit: waiting for another writer of {self.root} ...", file=sys.stderr, flush=True)
                fcntl.flock(handle, mode)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def checkpoints(self, task: str) -> Path:
        """The folder of a task's trainer checkpoints, one subfolder per run key."""
        return self.path(f"{CHECKPOINTS}/{task}")

    def logs(self, task: str) -> Path:
        return self.path(f"{LOGS}/{task}")

    @contextmanager
    def owning(self, task: str) -> Iterator[Path]:
        """Own a task's checkpoint folder for the block (a `flock` on its own `.lock`), so that two learns, or a
        learn and a forget, of one task never remove each other's files: the second is refused in one line.
        Yields the folder; it is removed on the way out when nothing but the lock is left in it."""
        handle = self._claim(task)
        if handle is None:
            raise SwitchcitError(f"task '{task}' is being learned by another process in store {self.root}: wait "
                                 "for it to end (or stop it), then try again")
        try:
            yield self.checkpoints(task)
        finally:
            self._release(task, handle)

    def _claim(self, task: str) -> IO | None:
        """The locked lock file of a task's checkpoint folder, or None while another process holds it."""
        folder = self.checkpoints(task)
        for _ in range(100):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                handle = open(folder / LOCK, "a+")  # noqa: SIM115 - closed by _release
            except FileNotFoundError:
                continue  # its last owner removed the folder as we made it
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                return None
            with suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(handle.fileno()), os.stat(folder / LOCK)):
                    return handle
            handle.close()  # its last owner removed this lock file as we opened it: claim the next one
        raise SwitchcitError(f"cannot lock {folder}: another process keeps removing it; try again")

    def _release(self, task: str, handle: IO) -> None:
        folder = self.checkpoints(task)
        with handle:  # closing it releases the lock, after the folder is gone
            if [p.name for p in folder.iterdir()] == [LOCK]:
                (folder / LOCK).unlink()
                folder.rmdir()
                with suppress(OSError):
                    folder.parent.rmdir()  # .checkpoints, once no task has any

    def drop_checkpoints(self, task: str) -> None:
        """Delete every run of a task's checkpoints; call it owning the task."""
        for run in self.checkpoints(task).iterdir():
            if run.name != LOCK:
                shutil.rmtree(run) if _real_dir(run) else run.unlink()

    def leftovers(self, task: str) -> bool:
        """Whether a task has checkpoints or logs in the store (a learn that never committed leaves them)."""
        from .data import check_task_name

        try:
            check_task_name(task)
        except SwitchcitError:
            return False  # no such folder can exist, and the name must not reach a path
        return any(self.root.joinpath(kind, task).exists() for kind in (CHECKPOINTS, LOGS))

    def drop_logs(self, task: str) -> None:
        logs = self.logs(task)
        if _real_dir(logs):
            shutil.rmtree(logs)
        with suppress(OSError):
            logs.parent.rmdir()  # logs/, once no task has any

    def check_ready(self) -> None:
        """Refuse, before hours of training are spent on it, a store that cannot be written now."""
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / f".write-test.{uuid.uuid4().hex[:8]}"
        try:
            probe.write_bytes(b"")
            probe.unlink(missing_ok=True)  # a concurrent sweep may have taken it already
        except OSError as exc:
            raise SwitchcitError(f"store {self.root} cannot be written ({exc.strerror}): fix its permissions or "
                                 "free space, then learn again") from None

    def commit(self, manifest: Manifest, keep: tuple[str, ...] = ()) -> Manifest:
        """Make `manifest` the store's state in one atomic step, then sweep files that neither it nor `keep`
        names (the previous generation's files, kept so that readers who opened it never see them vanish)."""
        stamp = now()
        manifest = replace(manifest, updated_at=stamp, created_at=manifest.created_at or stamp)
        for relative in manifest.live_paths():
            for path in [self.path(relative), *self.path(relative).rglob("*")]:
                if path.is_file():
                    with open(path, "rb") as handle:
                        os.fsync(handle.fileno())
        staging = self.root / f".{MANIFEST}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(staging, "w", encoding="utf-8") as handle:
                json.dump(manifest.to_json(), handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(staging, self.manifest_path)
        finally:
            staging.unlink(missing_ok=True)
        if self._made is not None:
            self._made.clear()  # named by the manifest now
        _fsync_dir(self.root)
        self.sweep(manifest, keep)
        return manifest

    def sweep(self, manifest: Manifest, keep: tuple[str, ...] = ()) -> None:
        """Delete the files and folders under adapters/, switch/ and memory/ that neither the manifest nor
        `keep` names. Only real files and folders are touched: a link is never followed, descended or removed."""
        live = {*manifest.live_paths(), *keep}
        for kind in KINDS:
            if not _real_dir(self.root / kind):
                continue
            for group in sorted(p for p in (self.root / kind).iterdir() if _real_dir(p)):
                for entry in sorted(group.iterdir()):
                    if f"{kind}/{group.name}/{entry.name}" in live or entry.is_symlink():
                        continue
                    shutil.rmtree(entry) if _real_dir(entry) else entry.unlink()
                if not any(group.iterdir()):
                    group.rmdir()
        for task in manifest.tasks:  # a committed run's checkpoints: a learn killed after its commit leaves them
            folder = self.root / CHECKPOINTS / task.name
            if task.run and all(map(_real_dir, (folder.parent, folder, folder / task.run))):
                handle = self._claim(task.name)
                if handle is not None:  # else a learn of the task runs now; it drops them at its own commit
                    shutil.rmtree(folder / task.run)
                    self._release(task.name, handle)
        for pattern in (f".{MANIFEST}.*.tmp", ".write-test.*"):  # left by killed commands
            for stale in self.root.glob(pattern):
                if stale.is_file() and not stale.is_symlink():
                    stale.unlink()


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()
