"""zhilu (智路): plan, run, watch and serve parallel training of PyTorch models."""

__version__ = "0.1.0"
