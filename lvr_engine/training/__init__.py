"""Training on the engine's runner and ops: the latent forward, curriculum, trainer."""
from .latent_forward import LatentForwardOutput, latent_forward, mirage_latent_loss, pool_image_embeddings

__all__ = ["latent_forward", "LatentForwardOutput", "mirage_latent_loss", "pool_image_embeddings"]
