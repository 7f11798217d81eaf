"""shardwise: Megatron-style tensor parallelism for PyTorch.

The library, read bottom-up: mesh (the rank grid) -> comm (collectives and their events) -> layers
(column/row linear, vocab embedding and cross-entropy, norm) -> nn (MLP, attention, block, GPT) ->
convert (parallelize a dense model by a plan) ; beside them checkpoint, profiler, planner. The
command line lives in shardwise.commands and is never imported from here.
"""

import sys as _sys

from . import comm
from .checkpoint import CheckpointError, consolidate, load_sharded, reshard, save_sharded
from .convert import (
    Colwise,
    FusedQKV,
    GatherSequence,
    Heads,
    Patch,
    Rowwise,
    SequenceParallelNorm,
    SplitSequence,
    Vocab,
    parallelize,
    plans,
)
from .launch import RankFailure, launch
from .layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from .layers.norm import Norm
from .live_reshard import Layout, reshard_training, switch_mesh
from .mesh import Mesh, get_mesh, init_mesh, set_default_mesh
from .nn import GPT, GPTConfig, ParallelAttention, ParallelMLP, ParallelTransformerBlock
from .planner import costmodel
from .profiler import Profile, profile

# Stable module paths from v0.1: `import shardwise.costmodel` / `from shardwise.plans import for_model`.
_sys.modules[__name__ + ".costmodel"] = costmodel
_sys.modules[__name__ + ".plans"] = plans

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ColumnParallelLinear",
    "Colwise",
    "FusedQKV",
    "GPT",
    "GPTConfig",
    "GatherSequence",
    "Heads",
    "Mesh",
    "Norm",
    "ParallelAttention",
    "ParallelMLP",
    "ParallelTransformerBlock",
    "Patch",
    "Profile",
    "RankFailure",
    "RowParallelLinear",
    "Rowwise",
    "SequenceParallelNorm",
    "SplitSequence",
    "Vocab",
    "VocabParallelEmbedding",
    "comm",
    "consolidate",
    "costmodel",
    "get_mesh",
    "init_mesh",
    "launch",
    "load_sharded",
    "parallelize",
    "plans",
    "profile",
    "reshard",
    "save_sharded",
    "set_default_mesh",
    "vocab_parallel_cross_entropy",
    "Layout",
    "reshard_training",
    "switch_mesh",
]
