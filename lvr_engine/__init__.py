"""lvr_engine: KV-cached, batched latent visual reasoning on fused kernels.

    from lvr_engine import LatentGenerator, LatentConfig
"""
from .engine import GenerationOutput, GenerationStats, LatentConfig, LatentGenerator

__version__ = "0.1.0"
__all__ = ["LatentConfig", "LatentGenerator", "GenerationOutput", "GenerationStats"]
