"""One decoding step with many adapters: base vs mixed.py's layouts, side by side, on one batch.

    python benchmarks/lora_step.py [--model M] [--adapters 4,32,64] [--batch 32] [--cached 64] [--steps 15]

Why a step and not a whole generation (`routed_generation.py`): the layouts differ only inside the LoRA
layers, and a step with a fixed cache length isolates them from prefill, sampling and routing, so a ratio
needs seconds, not minutes. Adapters are random rank-8 LoRA on all linear layers (speed does not depend on
weight values); rows are in adapter order, as `generate` puts them; row i uses adapter i * K // batch (K >
batch) or i % K. Paths: `base` (adapters off), `dense` (masked products), `grouped` (grouped products,
padded batched products off: the layout before), `padded` (the library's many-adapter layout: padded
batched products for decoding steps). Each step is timed alone; the median of all but the first two.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from switchcit import mixed
from switchcit.mixed import MixedLoRA, adapters_off, tuner_layers
from switchcit.models import DEFAULT_MODEL, load_base_model


def measure(model: str | None, adapters: int, batch: int, cached: int, steps: int) -> dict:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base, _ = load_base_model(model or DEFAULT_MODEL, "cpu", None)
    vocab = base.config.vocab_size
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    peft = get_peft_model(base, config, adapter_name="t0")
    for k in range(1, adapters):
        peft.add_adapter(f"t{k}", config)
    names = sorted((f"t{(i * adapters) // batch if adapters > batch else i % adapters}" for i in range(batch)),
                   key=lambda n: int(n[1:]))
    with torch.no_grad():
        cache = peft(input_ids=torch.randint(0, vocab, (batch, cached)), use_cache=True).past_key_values
    token = torch.randint(0, vocab, (batch, 1))
    layers = tuner_layers(peft)

    def step() -> None:
        with torch.no_grad():
            peft(input_ids=token, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # back to `cached` tokens: every step sees the same cache

    def base_step() -> None:
        with adapters_off(layers):
            step()

    def layout(dense: bool, padded: float):
        stacked = MixedLoRA(peft, [f"t{k}" for k in range(adapters)], dense=dense)

        def run() -> None:
            mixed.PADDED_UP_TO = padded
            with stacked.rows(names):
                step()
        return run

    default = mixed.PADDED_UP_TO
    paths = {"base": base_step, "dense": layout(True, default), "grouped": layout(False, 0.0),
             "padded": layout(False, default)}
    samples: dict[str, list[float]] = {k: [] for k in paths}
    try:
        for _ in range(steps):
            for key, run in paths.items():  # interleaved, so drift hits every path alike
                started = time.perf_counter()
                run()
                samples[key].append(time.perf_counter() - started)
    finally:
        mixed.PADDED_UP_TO = default
    ms = {k: 1000 * statistics.median(v[2:]) for k, v in samples.items()}
    return {"adapters": adapters, "batch": batch, "cached": cached, "step_ms": ms,
            "vs_base": {k: ms["base"] / v for k, v in ms.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--adapters", default="4,32,64")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cached", type=int, default=64)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be at least 3 (the first two are warm-up)")
    for adapters in [int(a) for a in args.adapters.split(",")]:
        row = measure(args.model, adapters, args.batch, args.cached, args.steps)
        print(json.dumps(row) if args.json else f"{adapters:>3} adapters, batch {args.batch}: " + ", ".join(
            f"{k} {v:.1f} ms ({row['vs_base'][k]:.3f}x)" for k, v in row["step_ms"].items()), flush=True)


if __name__ == "__main__":
    main()
