"""Sharded checkpoints: one safetensors file per tp rank plus an index, loadable at any tp.

`format`: the files, the index, checksums, atomic writes. `reader`: verified reads. `sharded`: the
collective save and load. `offline`: consolidate and reshard without any process group.
"""

from .format import CheckpointError, LoadResult, read_index
from .offline import consolidate, reshard
from .sharded import load_sharded, save_sharded

__all__ = ["CheckpointError", "LoadResult", "consolidate", "load_sharded", "read_index", "reshard", "save_sharded"]
