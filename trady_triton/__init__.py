"""trady_triton: TraDy memory-constrained fine-tuning that really saves the memory.

    controller = trady_triton.convert(model, keep_ratio=0.05, example_input=x)
    for epoch in range(epochs):
        controller.resample(epoch)
        ...train one epoch as usual...
"""

from .accounting import saved_bytes_by_module
from .api import convert, revert
from .controller import TraDyController
from .cost import LayerCost, selection_stats
from .dispatch import backend, get_backend, set_backend
from .measure import saved_tensor_bytes
from .ranking import LayerRanking, load_ranking, rank_layers, save_ranking
from .sampling import POLICY_NAMES

__all__ = [
    "convert", "revert", "TraDyController", "LayerCost", "selection_stats", "backend",
    "get_backend", "set_backend", "saved_tensor_bytes", "saved_bytes_by_module", "LayerRanking", "load_ranking",
    "rank_layers", "save_ranking", "POLICY_NAMES",
]
__version__ = "0.1.0"
