"""Reading learning data: the JSONL path before and after the move to `formats`, and memory on a large Parquet file.

    python benchmarks/data_loading.py [--rows 100000] [--repeats 3] [--old-ref REV] [--json]
    python benchmarks/data_loading.py --write-parquet big.parquet --mb 1000
    /usr/bin/time -v python benchmarks/data_loading.py --load big.parquet [--json]

The first writes --rows Alpaca rows of generated text to a temporary JSONL file and times `load_examples`
of src/switchcit/data.py as it was at --old-ref (the JSONL-only reader) and as it is, alternating, best
of --repeats each. The second writes a Parquet file of about --mb MB (row groups of 100k rows). The third
reads a file with `load_examples` and reports the process's peak resident memory beside the memory its
examples hold: a reader that kept the whole Arrow table besides the examples would peak near twice that.
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
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD_REF = "8915d79"  # the last commit with the JSONL-only reader
WORDINGS = [f"Instruction wording number {i}: do the thing to the words below." for i in range(20)]


def rows(n: int, seed: int = 0, input_words: int = 100, output_words: int = 50):
    """Alpaca rows of random words from the demo's vocabulary (~1 KB of text each)."""
    from switchcit.demo import WORDS

    rng = random.Random(seed)
    for _ in range(n):
        yield {"instruction": rng.choice(WORDINGS), "input": " ".join(rng.choices(WORDS, k=input_words)),
               "output": " ".join(rng.choices(WORDS, k=output_words))}


def old_loader(ref: str):
    """`load_examples` from data.py at `ref`, loaded as a module of the installed package."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:src/switchcit/data.py"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("switchcit._old_data")
    module.__package__ = "switchcit"
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{ref}:data.py", "exec"), module.__dict__)
    return module.load_examples


def speed(args) -> dict:
    from switchcit.data import load_examples

    loaders = {"old": old_loader(args.old_ref), "new": load_examples}
    best = {name: float("inf") for name in loaders}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        with path.open("w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows(args.rows))
        for _ in range(args.repeats):
            for name, load in loaders.items():
                started = time.perf_counter()
                examples = load(path)
                best[name] = min(best[name], time.perf_counter() - started)
                assert len(examples) == args.rows
        size = path.stat().st_size
    return {"rows": args.rows, "file_mb": size / 2**20, "seconds": best, "new_vs_old": best["new"] / best["old"],
            "old_ref": args.old_ref}


def write_parquet(path: Path, megabytes: float) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    written, seed = 0, 0
    with pq.ParquetWriter(path, pa.schema([(k, pa.string()) for k in ("instruction", "input", "output")])) as writer:
        while not path.exists() or path.stat().st_size < megabytes * 2**20:
            batch = list(rows(100_000, seed))
            writer.write_table(pa.Table.from_pylist(batch))
            written, seed = written + len(batch), seed + 1
    return {"path": str(path), "rows": written, "file_mb": path.stat().st_size / 2**20}


def resident_mb() -> float:
    """The process's resident memory now (Linux), not its high-water mark."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def load(path: Path) -> dict:
    """Peak memory of reading `path` over the resident memory before it (for a file much larger than the
    imports' own peak), and the memory its examples hold (objects and strings)."""
    import pyarrow.parquet  # noqa: F401 - imported before the baseline, which then holds no data

    from switchcit.data import load_examples
    baseline = resident_mb()
    started = time.perf_counter()
    examples = load_examples(path)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    held = sys.getsizeof(examples) + sum(sys.getsizeof(e) + sys.getsizeof(e.prompt) + sys.getsizeof(e.output)
                                         + (sys.getsizeof(e.wording) if e.wording is not None else 0)
                                         for e in examples)
    return {"path": str(path), "rows": len(examples), "file_mb": path.stat().st_size / 2**20,
            "examples_mb": held / 2**20, "baseline_rss_mb": baseline, "peak_rss_mb": peak,
            "peak_over_examples": (peak - baseline) / (held / 2**20), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--old-ref", default=OLD_REF, help=f"git revision of the old reader (default {OLD_REF})")
    parser.add_argument("--write-parquet", type=Path, default=None, metavar="PATH")
    parser.add_argument("--mb", type=float, default=1000, help="size of --write-parquet's file (default 1000)")
    parser.add_argument("--load", type=Path, default=None, metavar="PATH")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.write_parquet:
        result = write_parquet(args.write_parquet, args.mb)
    elif args.load:
        result = load(args.load)
    else:
        result = speed(args)
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
