"""Generations cached on disk per (weights, prompt): nothing is generated twice, and a killed run resumes.

The key names the weights that answered: 'base', 'adapter:<task>' (a SwitchCIT expert, shared by
SwitchCIT and the oracle), or '<method>@<stage>'. Outputs are appended after every batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

Request = tuple[str, str]  # (weights key, prompt)


class GenerationCache:
    def __init__(self, path: str | Path, batch_size: int = 16, progress: bool = True):
        self.path = Path(path)
        self.batch_size = batch_size
        self.progress = progress
        self.outputs: dict[Request, str] = {}
        if self.path.exists():
            text = self.path.read_text(encoding="utf-8")
            if text and not text.endswith("\n"):  # a line cut short by a kill: end it, skip it below
                with self.path.open("a", encoding="utf-8") as handle:
                    handle.write("\n")
            for line in text.splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.outputs[(row["key"], row["prompt"])] = row["output"]

    def generate(self, requests: list[Request], generate: Callable[[list[Request]], list[str]],
                 desc: str = "generate") -> list[str]:
        """Answer every request, calling `generate` on batches of the missing ones (similar lengths together)."""
        from tqdm.auto import tqdm

        missing = sorted({r for r in requests if r not in self.outputs}, key=lambda r: (len(r[1]), r))
        with tqdm(total=len(missing), desc=desc, unit="prompt", disable=not self.progress or not missing,
                  leave=False) as bar, self.path.open("a", encoding="utf-8") as handle:
            for start in range(0, len(missing), self.batch_size):
                batch = missing[start:start + self.batch_size]
                for (key, prompt), output in zip(batch, generate(batch)):
                    self.outputs[(key, prompt)] = output
                    handle.write(json.dumps({"key": key, "prompt": prompt, "output": output}) + "\n")
                handle.flush()
                bar.update(len(batch))
        return [self.outputs[r] for r in requests]
