"""Training on the engine's runner and ops: the latent forward, batch collation, the curriculum trainer."""
from .latent_forward import LatentForwardOutput, latent_forward, mirage_latent_loss, pool_image_embeddings

__all__ = ["latent_forward", "LatentForwardOutput", "mirage_latent_loss", "pool_image_embeddings",
           "Trainer", "TrainConfig", "collate"]


def __getattr__(name):  # the trainer pulls in accelerate: import it only when asked for
    if name == "Trainer":
        from .trainer import Trainer
        return Trainer
    if name == "TrainConfig":  # plain data: no accelerate
        from .train_config import TrainConfig
        return TrainConfig
    if name == "collate":
        from .collate import collate
        return collate
    raise AttributeError(name)
