"""HMST: a sparse MoE transformer with episodic and semantic memory."""

from hmst.configs import (  # noqa: F401
    HMSTConfig,
    ModelConfig,
    get_base_config,
    get_large_config,
    get_micro_config,
    get_small_config,
    get_tiny_config,
)
from hmst.memory import EpisodicMemory, MemoryConsolidator, SemanticMemory  # noqa: F401
from hmst.models.base_moe import BaseMoEModel  # noqa: F401
from hmst.models.critic import CriticModel  # noqa: F401
from hmst.models.ssm import EpisodicMemorySSM  # noqa: F401
from hmst.observe.hooks import Observer  # noqa: F401
from hmst.tokenizer import HMSTTokenizer  # noqa: F401

__version__ = "0.1.0"

# Parts of the design's public API that are not built yet. They are absent, and say so,
# rather than importable shells with random weights.
_NOT_YET = {
    "HMSTInferenceEngine": "issue #5 (inference engine)",
    "MetaController": "issue #5 (meta-controller)",
}


def __getattr__(name):
    if name in _NOT_YET:
        raise ImportError(f"hmst.{name} is not implemented yet: see {_NOT_YET[name]}")
    raise AttributeError(f"module 'hmst' has no attribute {name!r}")
