"""spikeprune: learn the sparse structure of spiking neural networks during training.

>>> from spikeprune import create_model, load_config, Trainer, measure
"""

from ._version import __version__
from .api import Pruner, prune
from .compact import compact
from .config import load_config
from .data import build_loaders, create_dataset, list_datasets
from .measure import measure
from .models import create_model, list_models
from .sparsity import MaskEngine, create_method, list_methods
from .sparsity.pruned import load_pruned
from .train import Trainer

__all__ = ["create_model", "list_models", "create_dataset", "build_loaders", "list_datasets", "MaskEngine",
           "create_method", "list_methods", "measure", "compact", "load_config", "Trainer", "prune", "Pruner",
           "load_pruned", "__version__"]
