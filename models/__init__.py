"""Model definitions. No Hydra here: models are plain ``nn.Module``s built from small configs."""
from models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
