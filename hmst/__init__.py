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
from hmst.inference.engine import EngineConfig, HMSTInferenceEngine  # noqa: F401
from hmst.memory import EpisodicMemory, MemoryConsolidator, SemanticMemory  # noqa: F401
from hmst.models.base_moe import BaseMoEModel  # noqa: F401
from hmst.models.critic import CriticModel  # noqa: F401
from hmst.models.meta_controller import MetaController  # noqa: F401
from hmst.models.meta_controller import StateSummaryEncoder  # noqa: F401
from hmst.models.ssm import EpisodicMemorySSM  # noqa: F401
from hmst.observe.hooks import Observer  # noqa: F401
from hmst.tokenizer import HMSTTokenizer  # noqa: F401

__version__ = "0.1.0"
