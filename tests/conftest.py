import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "data", "tinyshakespeare.txt")
sys.path.insert(0, ROOT)
# Tests use tiny tensors: one intra-op thread is as fast, and it never oversubscribes a
# 2-core CI machine that also runs the subprocess tests.
torch.set_num_threads(1)

from hmst.configs.model_config import ModelConfig  # noqa: E402
from hmst.observe.hooks import Observer  # noqa: E402
from hmst.tokenizer import HMSTTokenizer  # noqa: E402

# Tiny model flags for train.py subprocess tests (seconds per run).
TINY_FLAGS = [
    "--set",
    "model.d_model=32",
    "--set",
    "model.n_layers=2",
    "--set",
    "model.n_heads=4",
    "--set",
    "model.d_ff=64",
    "--set",
    "model.n_experts=4",
    "--seq-len",
    "32",
    "--vocab-size",
    "300",
    "--num-threads",
    "1",
    "--log-every",
    "1",
]


def tiny_config(**kw) -> ModelConfig:
    base = dict(
        vocab_size=300,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        n_experts=4,
        max_seq_len=32,
    )
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="session")
def corpus_text():
    with open(CORPUS, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="session")
def tokenizer(corpus_text):
    return HMSTTokenizer.train([corpus_text[:200_000]], 300)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class Recorder(Observer):
    """Records every event as (name, args)."""

    def __init__(self):
        self.events = []

    def __getattribute__(self, name):
        if name.startswith("on_"):
            return lambda *a: self.events.append((name[3:], a))
        return object.__getattribute__(self, name)

    def count(self, kind):
        return sum(1 for k, _ in self.events if k == kind)
