"""shardwise: Megatron-style tensor parallelism for PyTorch."""

from . import comm, costmodel
from .checkpoint import consolidate, load_sharded, reshard, save_sharded
from .launch import RankFailure, launch
from .layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from .mesh import Mesh, get_mesh, init_mesh, set_default_mesh
from .nn import GPT, GPTConfig, ParallelAttention, ParallelMLP, ParallelTransformerBlock
from .parallelize import FusedQKV, Heads, Patch, parallelize
from .profile import Profile, profile

__version__ = "0.1.0"

__all__ = [
    "ColumnParallelLinear",
    "FusedQKV",
    "Heads",
    "Patch",
    "consolidate",
    "load_sharded",
    "parallelize",
    "reshard",
    "save_sharded",
    "GPT",
    "GPTConfig",
    "ParallelAttention",
    "ParallelMLP",
    "ParallelTransformerBlock",
    "Mesh",
    "Profile",
    "RankFailure",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "comm",
    "costmodel",
    "get_mesh",
    "init_mesh",
    "launch",
    "profile",
    "set_default_mesh",
    "vocab_parallel_cross_entropy",
]
