"""Mixed-adapter generation speed on a GPU, on random-initialised models of real shapes (no model files).

    python benchmarks/gpu_routed_generation.py --out results.jsonl [--shapes smollm2-135m,llama-7b]
        [--batches 16,32] [--adapters 4,8] [--device cuda] [--dtype bfloat16] [--deadline-s 450]

For each (shape, batch, adapters): tokens/s of the base model, one adapter for the whole batch (PEFT),
PEFT's mixed-adapter batch (`adapter_names=`), switchcit's batched path (mixed.py), and the naive path
(each request alone with its adapter, measured on up to 8 requests). Speed does not depend on weight
values, so weights are random. Each result is appended to --out as soon as it is measured; configs
left when the deadline passes are skipped. Routing (encoder + switch) is not timed here: it runs on
the CPU side and is measured by routed_generation.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
}


def build(shape: str, adapters: int, rank: int, device: str, dtype):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], max_position_embeddings=1024)).to(dtype)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights=False)
    peft = get_peft_model(model, lora, adapter_name="t0")
    for k in range(1, adapters):
        peft.add_adapter(f"t{k}", lora)
    peft.eval()
    return peft


def measure(peft, batch: int, adapters: int, prompt_len: int, new_tokens: int, repeats: int, device: str) -> dict:
    import torch

    from switchcit.mixed import MixedLoRA

    names = [f"t{i % adapters}" for i in range(batch)]
    ids = torch.randint(10, peft.config.vocab_size, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
               pad_token_id=0)
    fast = MixedLoRA(peft, [f"t{k}" for k in range(adapters)])

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def run(rows: slice, **kwargs):
        sync()
        started = time.perf_counter()
        with torch.no_grad():
            peft.generate(input_ids=ids[rows], attention_mask=mask[rows], **gen, **kwargs)
        sync()
        return time.perf_counter() - started

    def base():
        with peft.disable_adapter():
            return run(slice(None))

    def single():
        peft.set_adapter("t0")
        return run(slice(None))

    def mixed():
        with fast.rows(names):
            return run(slice(None))

    def naive():
        rows = min(batch, 8)
        total = 0.0
        for i in range(rows):
            peft.set_adapter(names[i])
            total += run(slice(i, i + 1))
        return total * batch / rows

    paths = {"base": base, "single_adapter": single, "peft_mixed": lambda: run(slice(None), adapter_names=names),
             "mixed": mixed, "naive": naive}
    for fn in paths.values():  # warm-up round
        fn()
    seconds = {k: sorted(fn() for _ in range(repeats))[repeats // 2] for k, fn in paths.items()}
    tps = {k: batch * new_tokens / s for k, s in seconds.items()}
    return {"tokens_per_s": tps, "mixed_vs_base": tps["mixed"] / tps["base"],
            "mixed_vs_single": tps["mixed"] / tps["single_adapter"], "mixed_vs_naive": tps["mixed"] / tps["naive"],
            "peft_mixed_vs_base": tps["peft_mixed"] / tps["base"],
            "peft_mixed_vs_single": tps["peft_mixed"] / tps["single_adapter"]}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default="smollm2-135m,llama-7b")
    parser.add_argument("--batches", default="16,32")
    parser.add_argument("--adapters", default="4,8")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--deadline-s", type=float, default=450)
    args = parser.parse_args()

    started = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    for shape in args.shapes.split(","):
        adapter_counts = [int(a) for a in args.adapters.split(",")]
        peft = build(shape, max(adapter_counts), args.rank, args.device, dtype)
        for adapters in adapter_counts:
            for batch in [int(b) for b in args.batches.split(",")]:
                if time.perf_counter() - started > args.deadline_s:
                    print(f"deadline reached: skipping {shape} adapters={adapters} batch={batch}", flush=True)
                    continue
                result = measure(peft, batch, adapters, args.prompt_len, args.new_tokens, args.repeats, args.device)
                result["config"] = {"shape": shape, "batch": batch, "adapters": adapters, "rank": args.rank,
                                    "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                                    "dtype": args.dtype, "device": card, "torch": torch.__version__}
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(result) + "\n")
                print(json.dumps(result), flush=True)
        del peft
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
