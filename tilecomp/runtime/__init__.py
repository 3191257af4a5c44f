"""Engines that run a model: the eager reference (and the generated megakernel)."""
from .reference import GenerationResult, ReferenceEngine

__all__ = ["GenerationResult", "ReferenceEngine"]
