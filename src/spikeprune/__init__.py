"""spikeprune: learn the sparse structure of spiking neural networks during training."""

__version__ = "0.1.0"
