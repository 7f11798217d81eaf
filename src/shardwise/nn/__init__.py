from ..layers.norm import Norm
from .attention import ParallelAttention
from .block import ParallelTransformerBlock
from .gpt import GPT, GPTConfig
from .mlp import ParallelMLP

__all__ = ["GPT", "GPTConfig", "Norm", "ParallelAttention", "ParallelMLP", "ParallelTransformerBlock"]
