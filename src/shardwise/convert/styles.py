"""Plan styles: each one an object whose `apply(module, name, mesh)` returns the module that replaces
`module` (or `module` itself, changed in place). A style of your own is any object with that method:

    class Frozen:
        def apply(self, module, name, mesh):
            module.requires_grad_(False)
            return module

Built in: Colwise, Rowwise, Vocab, Heads, FusedQKV, Patch (here) and the sequence-parallel ones
(sequence.py). The strings "colwise", "rowwise", "vocab", "colwise_gather" and "sp_norm" name Colwise(),
Rowwise(), Vocab(), Colwise(gather_output=True) and SequenceParallelNorm().
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..heads import HeadLayout, head_layout, head_shards, layout_hint
from ..layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from ..layers.embedding import TiedLMHead
from ..layers.linear import adopt_shards
from ..mesh import Mesh
from ..sharding import set_shard_info, shard_spec
from .sequence import SequenceParallelNorm, sequence_first

__all__ = ["Colwise", "FusedQKV", "Heads", "Patch", "Rowwise", "Vocab", "as_style", "sharded_table"]

_TABLE = "_shardwise_sharded_table"  # on a dense embedding weight: the VocabParallelEmbedding now holding it


def sharded_table(weight: torch.Tensor) -> VocabParallelEmbedding | None:
    """The vocabulary-parallel embedding a dense weight was sharded into by Vocab, if any (ties)."""
    return getattr(weight, _TABLE, None)


def dense_linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
    """(weight [out, in], bias [out] or None, in, out) of an nn.Linear or a transformers Conv1D,
    which stores its weight transposed ([in, out])."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias, module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        weight = module.weight.t()
        return weight, module.bias, weight.shape[1], weight.shape[0]
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def sharded_linear(cls, module: nn.Module, mesh: Mesh, layout: dict | None = None, **kwargs) -> nn.Module:
    """`cls` (Column/RowParallelLinear) holding this rank's shard of a dense linear; `layout`: the
    head-layout hint its sharded parameters carry (ShardInfo.layout)."""
    weight, bias, fin, fout = dense_linear(module)
    layer = cls(fin, fout, bias is not None, mesh=mesh, device="meta", dtype=weight.dtype, **kwargs)
    adopt_shards(layer, {"weight": weight} | ({"bias": bias} if bias is not None else {}))
    for param in layer.parameters(recurse=False):
        if layout is not None and shard_spec(param) is not None:  # a row layer's bias is whole: no hint
            set_shard_info(param, layout=layout)
    if not isinstance(module, nn.Linear):
        # The dense model stored it [in, out] (Conv1D): checkpoints transpose back to that layout.
        set_shard_info(layer.weight, transposed=True)
    return layer


@dataclass(frozen=True)
class Colwise:
    """nn.Linear/Conv1D -> ColumnParallelLinear (rows split). gather_output: gather the output over tp
    (an output layer); one tied to an embedding sharded by Vocab shares that table (TiedLMHead).
    sequence_parallel: the input is this rank's tokens (dim `seq_dim`), all-gathered by the layer (one
    all-gather per layer: for projections sharing an input, put GatherSequence() on their parent)."""

    gather_output: bool = False
    sequence_parallel: bool = False
    seq_dim: int = 1

    def apply(self, module: nn.Module, name: str, mesh: Mesh) -> nn.Module:
        if self.sequence_parallel:
            if self.gather_output:
                raise ValueError("Colwise: gather_output with sequence_parallel is not supported; use "
                                 "GatherSequence() on the module and Colwise(gather_output=True)")  # fmt: skip
            layer = sharded_linear(ColumnParallelLinear, module, mesh, sequence_parallel=True)
            return sequence_first(layer, self.seq_dim, splits=False)
        if self.gather_output:
            table = sharded_table(getattr(module, "weight", None))
            if table is not None:  # tied to an embedding already sharded: share its table
                return TiedLMHead(table, gather_output=True, bias=getattr(module, "bias", None))
        return sharded_linear(ColumnParallelLinear, module, mesh, gather_output=self.gather_output)


@dataclass(frozen=True)
class Rowwise:
    """nn.Linear/Conv1D -> RowParallelLinear (columns split). sequence_parallel: the output is
    reduce-scattered over the sequence (dim `seq_dim`, 1 for Hugging Face's [b, s, h]) instead of
    all-reduced, so each rank keeps its own tokens (see sequence.py)."""

    sequence_parallel: bool = False
    seq_dim: int = 1

    def apply(self, module: nn.Module, name: str, mesh: Mesh) -> nn.Module:
        layer = sharded_linear(RowParallelLinear, module, mesh, sequence_parallel=self.sequence_parallel)
        return sequence_first(layer, self.seq_dim, splits=True) if self.sequence_parallel else layer


@dataclass(frozen=True)
class Vocab:
    """nn.Embedding -> VocabParallelEmbedding (rows of the table split, output replicated). Applied
    before other styles, so an output layer tied to it (Colwise(gather_output=True)) shares the table."""

    order = 0  # parallelize applies lower orders first

    def apply(self, module: nn.Module, name: str, mesh: Mesh) -> nn.Module:
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"expected nn.Embedding, got {type(module).__name__}")
        new = VocabParallelEmbedding.from_dense(module, mesh)
        setattr(module.weight, _TABLE, new)
        return new


@dataclass(frozen=True)
class Heads:
    """A projection of an attention module, sharded on head boundaries.

    role "q": output rows of this rank's q heads; "k"/"v": rows of the kv heads those q heads read;
    "o": input columns of this rank's q heads (row-parallel). Uneven splits deal whole heads out
    (9 heads on tp=2: 5 and 4); a kv head read on several ranks is held by each, grads summed.
    `expand_kv=True` (what Hugging Face attention needs when a kv group is cut across ranks):
    k/v give one kv head per local q head, so a plain repeat factor of 1 maps them.
    `sequence_parallel` (role "o" only): reduce-scatter the output over the sequence, as Rowwise.
    """

    role: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    expand_kv: bool = False
    sequence_parallel: bool = False

    def __post_init__(self):
        if self.role not in ("q", "k", "v", "o"):
            raise ValueError(f"Heads role must be 'q', 'k', 'v' or 'o', got {self.role!r}")
        if self.sequence_parallel and self.role != "o":
            raise ValueError("Heads(sequence_parallel=True) is for role 'o'; q/k/v read the gathered sequence "
                             "(put GatherSequence() on the attention module)")  # fmt: skip

    def layout(self, mesh: Mesh) -> HeadLayout:
        return head_layout(self.num_heads, self.num_kv_heads, mesh.tp_size, mesh.tp_rank)

    def apply(self, module: nn.Module, name: str, mesh: Mesh) -> nn.Module:
        _, _, fin, fout = dense_linear(module)
        d = self.head_dim
        expected = (self.num_kv_heads if self.role in "kv" else self.num_heads) * d
        got = fin if self.role == "o" else fout
        if got != expected:
            raise ValueError(f"role {self.role!r} expects {expected} features (heads x head_dim), the module has {got}")
        shards = head_shards(self.num_heads, self.num_kv_heads, d, mesh.tp_size, mesh.tp_rank, self.expand_kv)
        role = {"k": "kv", "v": "kv"}.get(self.role, self.role)
        hint = layout_hint("heads", self.num_heads, self.num_kv_heads, d, role, self.expand_kv)
        if self.role == "o":
            layer = sharded_linear(RowParallelLinear, module, mesh, hint, in_range=shards.o.ranges[0],
                                   sequence_parallel=self.sequence_parallel)  # fmt: skip
            return sequence_first(layer, 1, splits=True) if self.sequence_parallel else layer
        spec = shards.q if self.role == "q" else shards.kv
        return sharded_linear(ColumnParallelLinear, module, mesh, hint, out_ranges=spec.ranges,
                              replicated=spec.replicated)  # fmt: skip


@dataclass(frozen=True)
class FusedQKV:
    """One projection whose output is q|k|v stacked ([(num_heads + 2 * num_kv_heads) * head_dim, in]):
    each rank keeps the rows of its q heads, and of the kv heads they read, from each block."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    def apply(self, module: nn.Module, name: str, mesh: Mesh) -> nn.Module:
        _, _, _, fout = dense_linear(module)
        nh, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if fout != (nh + 2 * nkv) * d:
            raise ValueError(f"a fused q|k|v projection of {nh}+2x{nkv} heads x {d} has {(nh + 2 * nkv) * d} "
                             f"outputs, this one has {fout}")  # fmt: skip
        spec = head_shards(nh, nkv, d, mesh.tp_size, mesh.tp_rank).qkv
        hint = layout_hint("fused_qkv", nh, nkv, d)
        return sharded_linear(ColumnParallelLinear, module, mesh, hint, out_ranges=spec.ranges,
                              replicated=spec.replicated)  # fmt: skip


@dataclass(frozen=True)
class Patch:
    """Call fn(module, mesh) on the matched module instead of replacing it: set local head counts
    and the like on modules that compute on heads."""

    fn: Callable[[nn.Module, Mesh], None]

    def apply(self, module: nn.Module, name: str, mesh: Mesh) -> nn.Module:
        self.fn(module, mesh)
        return module


STRING_STYLES = {"colwise": Colwise(), "rowwise": Rowwise(), "vocab": Vocab(),
                 "colwise_gather": Colwise(gather_output=True), "sp_norm": SequenceParallelNorm()}  # fmt: skip


def as_style(style, where: str):
    """A plan value as a style object (strings mapped), or a clear error naming what a style is."""
    if isinstance(style, str):
        if style not in STRING_STYLES:
            raise ValueError(f"unknown style {style!r} for {where!r}; use one of {tuple(STRING_STYLES)} or a style "
                             "object (anything with apply(module, name, mesh))")  # fmt: skip
        return STRING_STYLES[style]
    if not callable(getattr(style, "apply", None)):
        raise ValueError(f"style {style!r} for {where!r} is neither a style name {tuple(STRING_STYLES)} nor an object "
                         "with apply(module, name, mesh) -> module")  # fmt: skip
    return style
