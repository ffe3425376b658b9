"""Applying a Plan to a model through PyTorch's distributed engine (DDP, FSDP2, DeviceMesh)."""
