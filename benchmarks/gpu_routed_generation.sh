#!/usr/bin/env bash
# One prepared run for a GPU machine with PyTorch, transformers and PEFT (no network, no model files).
# Usage: bash benchmarks/gpu_routed_generation.sh [OUT.jsonl]   — ends within 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-.}/gpu_routed_generation.jsonl}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 470 python benchmarks/gpu_routed_generation.py --out "$OUT" --shapes smollm2-135m,llama-7b \
  --batches 16,32 --adapters 4,8 --deadline-s 420
