"""What learning or forgetting a task writes to the store, under its writer lock.

New files go to fresh paths; the switch is rebuilt from every task's memory as a step before the
commit, and the manifest that names it all replaces the old one in one atomic step (store.py): an
interrupted transaction changes nothing the store's readers see.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .encoders import views as view_count
from .memory import MemoryConfig, build_switch, remember
from .store import Manifest, Store, TaskEntry, now

if TYPE_CHECKING:
    import torch

    from .data import Task
    from .experts import ExpertConfig
    from .gaussian import GaussianSwitch
    from .switch import Switch, SwitchConfig


def write_task(store: Store, task: Task, features: torch.Tensor, variants: tuple[torch.Tensor, torch.Tensor] | None,
               stats: dict, expert: ExpertConfig, memory: MemoryConfig, switch: SwitchConfig, run: str,
               views: int = 1) -> TaskEntry:
    """Move the just-trained adapter (`stats["adapter"]`, a plain PEFT folder the trainer saved inside the
    store, in the checkpoints of `run`) into place and save the task's memory; returns its manifest entry."""
    adapter = store.fresh("adapters", task.name)
    store.path(adapter).parent.mkdir(parents=True, exist_ok=True)
    stats["adapter"].rename(store.path(adapter))
    memory_path = store.fresh("memory", task.name, ".safetensors")
    remember(features, memory, switch, task.wordings, variants, views).save(store.path(memory_path))
    return TaskEntry(task.name, adapter, memory_path, len(task.examples), memory.size_for(len(features)),
                     stats["steps"], round(stats["final_loss"], 4), expert.to_dict(), now(),
                     None if stats.get("eval_loss") is None else round(stats["eval_loss"], 4), run)


def commit(store: Store, manifest: Manifest, tasks: list[TaskEntry], config: SwitchConfig,
           full_features: dict[str, torch.Tensor], background: torch.Tensor | None, keep_previous: bool = True
           ) -> tuple[Manifest, tuple[str, Switch | GaussianSwitch] | None]:
    """Build the switch for `tasks` from their memory (all features where given) and the background mean,
    then commit: the new manifest, and the switch with its store path (None when no task is left). The
    previous manifest's files stay until the next commit unless `keep_previous` is off (forget: nothing of a
    task may stay)."""
    built = None
    if tasks:
        switch = build_switch({t.name: store.memory(t) for t in tasks}, config, full_features, background,
                              view_count(manifest.encoder))
        path = store.fresh("switch", f"v{manifest.generation + 1}")
        switch.save(store.path(path))
        built = path, switch
    keep = tuple(manifest.live_paths()) if keep_previous else ()
    return store.commit(manifest.with_tasks(tasks, built[0] if built else None), keep), built
