"""Models: the tiny MoE LM and adapters for Hugging Face MoE models."""

from .tiny import LMOutput, TinyMoEConfig, TinyMoELM

__all__ = ["LMOutput", "TinyMoEConfig", "TinyMoELM"]
