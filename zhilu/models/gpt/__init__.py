"""zhilu's Llama-style decoder: the model, its tensor-parallel plan and its spec."""

from zhilu.models.gpt.model import GPT, build_model

__all__ = ["GPT", "build_model"]
