from .attention import ParallelAttention
from .block import ParallelTransformerBlock
from .gpt import GPT, GPTConfig
from .mlp import ParallelMLP
from .norm import Norm

__all__ = ["GPT", "GPTConfig", "Norm", "ParallelAttention", "ParallelMLP", "ParallelTransformerBlock"]
