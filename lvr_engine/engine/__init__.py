"""Inference engine: KV cache, decoder runner, sampler and LatentGenerator."""
from .config import LatentConfig
from .generator import GenerationOutput, GenerationStats, LatentGenerator

__all__ = ["LatentConfig", "LatentGenerator", "GenerationOutput", "GenerationStats"]
