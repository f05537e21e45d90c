"""Memory hierarchy (issue #4): FAISS semantic store, SSM-keyed episodic buffer, and the
consolidator that moves important episodes into semantic memory."""

from hmst.memory.consolidation import (  # noqa: F401
    ConsolidationReport,
    MemoryConsolidator,
)
from hmst.memory.episodic import EpisodicHit, EpisodicMemory  # noqa: F401
from hmst.memory.index import CorruptFileError, IndexConfig, VectorIndex  # noqa: F401
from hmst.memory.semantic import (  # noqa: F401
    MemoryFullError,
    SearchResult,
    SemanticMemory,
)
