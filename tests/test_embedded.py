"""The embedded defaults end to end (slow: loads the 135M model). Run with `pytest -m slow`."""

import pytest
import torch

from switchcit import ContinualModel, ExpertConfig
from switchcit.demo import demo_stream
from switchcit.encoders import DEFAULT_ENCODER
from switchcit.supervision import answer_loss, collate, tokenize_example

pytestmark = pytest.mark.slow


def test_embedded_model_learns_and_routes(tmp_path):
    stream = demo_stream(n_train=48, n_test=8, seed=1)[2:4]
    cm = ContinualModel(tmp_path / "store", progress=False, expert_config=ExpertConfig(max_steps=12, epochs=100))
    for train, _ in stream:
        cm.learn(train)
    manifest = cm.store.read()
    assert manifest.base_model == "embedded:SmolLM2-135M-Instruct"
    assert manifest.encoder == DEFAULT_ENCODER == "embedded:all-MiniLM-L6-v2+segments"
    for train, test in stream:
        answers = cm.generate(test.prompts, max_new_tokens=12)
        assert [a.task for a in answers] == [test.name] * len(answers)
        batch = collate([tokenize_example(cm.tokenizer, e, 512) for e in train.examples[:8]], cm.tokenizer.pad_token_id)
        with torch.no_grad():
            cm.model.set_adapter(train.name)
            tuned = answer_loss(cm.model, batch)
            with cm.model.disable_adapter():
                base = answer_loss(cm.model, batch)
        assert tuned < base
