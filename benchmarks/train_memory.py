"""Training memory and time with and without gradient checkpointing, side by side in one run.

    python benchmarks/train_memory.py [--json] [--model M] [--steps 4] [--batch-size 8] [--tokens 512]

Each mode learns one task of long rows (prompt and answer ~`--tokens` tokens together) in a fresh child
process, so one mode's memory cannot hide in the other's: peak resident memory of the process (CPU), or
peak allocated GPU memory on a GPU. `checkpointing_memory_ratio` is on / off (lower is better);
`checkpointing_time_ratio` the price in time.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    import torch

    from switchcit import ContinualModel, Example, ExpertConfig, Task

    words = ["apple", "river", "stone", "cloud", "table", "horse", "pepper", "window"]
    rng = random.Random(0)
    half = max(1, args.tokens // 4)  # a word is ~2 tokens: half the row in the prompt, half in the answer
    examples = [Example(f"Repeat these words.\n\n{' '.join(rng.choices(words, k=half))}",
                        " ".join(rng.choices(words, k=half))) for _ in range(64)]
    config = ExpertConfig(max_steps=args.steps, epochs=100, batch_size=args.batch_size, max_length=args.tokens,
                          gradient_checkpointing=args.mode == "on")
    with tempfile.TemporaryDirectory() as tmp:
        cm = ContinualModel(Path(tmp) / "store", base_model=args.model, progress=False, expert_config=config)
        cm.model  # noqa: B018 - loading is not training
        cm.encoder.encode(["warm up"])
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        cm.learn(Task("long", examples))
        seconds = time.perf_counter() - started
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "gpu_peak_mib": gpu, "peak_rss_mib": rss}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512, help="training tokens per row")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--mode", choices=["off", "on"], help=argparse.SUPPRESS)  # set in the child processes
    args = parser.parse_args()
    if args.mode:
        return child(args)
    result: dict = {"config": {"model": args.model or "embedded SmolLM2-135M", "steps": args.steps,
                               "batch_size": args.batch_size, "tokens": args.tokens}}
    for mode in ("off", "on"):
        command = [sys.executable, __file__, "--mode", mode, "--steps", str(args.steps), "--batch-size",
                   str(args.batch_size), "--tokens", str(args.tokens), *(["--model", args.model] if args.model else [])]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        result[mode] = json.loads(out.strip().splitlines()[-1])
    memory = "gpu_peak_mib" if result["off"]["gpu_peak_mib"] else "peak_rss_mib"
    result["checkpointing_memory_ratio"] = result["on"][memory] / result["off"][memory]
    result["checkpointing_time_ratio"] = result["on"]["seconds"] / result["off"]["seconds"]
    if args.json:
        print(json.dumps(result))
        return
    for mode in ("off", "on"):
        r = result[mode]
        gpu = f", GPU peak {r['gpu_peak_mib']:.0f} MiB" if r["gpu_peak_mib"] else ""
        rss = f"peak RSS {r['peak_rss_mib']:.0f} MiB"
        print(f"gradient checkpointing {mode:>3}: learn {r['seconds']:6.1f} s, {rss}{gpu}")
    print(f"memory on/off: {result['checkpointing_memory_ratio']:.2f}, "
          f"time on/off: {result['checkpointing_time_ratio']:.2f}")


if __name__ == "__main__":
    main()
