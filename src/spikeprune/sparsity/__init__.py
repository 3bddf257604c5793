"""Sparsity: the mask engine, importance scores and the compression methods."""

from .masks import MaskEngine, erk_densities, init_masks, random_mask
from .methods import Method, create_method, list_methods, register_method
from .scores import ActivityMonitor, pq_index, sap_prune_count, sap_retained

__all__ = ["MaskEngine", "init_masks", "erk_densities", "random_mask", "Method", "create_method", "list_methods",
           "register_method", "ActivityMonitor", "pq_index", "sap_retained", "sap_prune_count"]
