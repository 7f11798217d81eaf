"""Sequence parallelism for models that were not written for it (Hugging Face's, batch-first [b, s, h]).

Between the tensor-parallel regions each rank keeps only its s/tp tokens; a region is entered by an
all-gather of the sequence and left by a reduce-scatter (Megatron). For a LLaMA decoder layer:

    input_layernorm           SequenceParallelNorm(): this rank's tokens, weight grads summed over tp
    self_attn                 GatherSequence(): all-gather hidden_states before q/k/v (plain Heads), so
                              the attention sees the whole sequence (its reshapes, rotary and mask need it)
    self_attn.o_proj          Heads("o", ..., sequence_parallel=True): reduce-scatter instead of all-reduce
    post_attention_layernorm, mlp, mlp.down_proj: the same again

and SplitSequence() on the first layer's input, GatherSequence(output=True) on the final norm's output.
GatherSequence's backward only splits: the q/k/v (gate/up) layers inside already sum their input grads
over tp (copy_to_tp), so the grad it receives is the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import comm
from ..layers.norm import Norm
from ..mesh import Mesh

__all__ = ["GatherSequence", "SequenceParallelNorm", "SplitSequence", "sequence_first"]


def _check_split(x: torch.Tensor, dim: int, mesh: Mesh, tag: str) -> None:
    if x.dim() <= dim or x.shape[dim] % mesh.tp_size:
        raise ValueError(
            f"{tag}: sequence parallelism splits dim {dim} of {list(x.shape)} over tp={mesh.tp_size}; use a "
            f"sequence length that is a multiple of {mesh.tp_size}"
        )


def sequence_first(layer: nn.Module, dim: int, splits: bool) -> nn.Module:
    """Let a shardwise sequence-parallel layer (which splits and gathers dim 0) run on inputs whose
    sequence is dim `dim`: its input and output are moved, by hooks, so its parameter names stay.
    splits: the layer reduce-scatters its input's sequence (row-parallel), which tp must divide."""

    def before(module, args):
        if splits:
            _check_split(args[0], dim, layer.mesh, type(layer).__name__)
        if dim == 0:
            return None
        return (args[0].movedim(dim, 0), *args[1:])

    layer.register_forward_pre_hook(before)
    layer.register_forward_hook(lambda module, args, out: out.movedim(0, dim))  # identity for dim 0
    return layer


def _map_input(module: nn.Module, fn) -> None:
    """Apply fn to the module's hidden states: its first positional argument, or `hidden_states`."""

    def hook(mod, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        if "hidden_states" not in kwargs:
            raise ValueError(
                f"{type(mod).__name__}: expected the hidden states as the first argument or hidden_states="
            )
        return args, kwargs | {"hidden_states": fn(kwargs["hidden_states"])}

    module.register_forward_pre_hook(hook, with_kwargs=True)


def _map_output(module: nn.Module, fn) -> None:
    def hook(mod, args, out):
        return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)

    module.register_forward_hook(hook)


@dataclass(frozen=True)
class SplitSequence:
    """Keep this rank's tokens of the module's input (dim `dim`): [b, s, h] -> [b, s/tp, h]; backward
    all-gathers the grad. Put it on the first decoder layer (positions and masks are made before it)."""

    dim: int = 1

    def apply(self, module: nn.Module, name: str, mesh: Mesh) -> nn.Module:
        def split(x):
            _check_split(x, self.dim, mesh, name)
            return comm.scatter_to_tp(x.movedim(self.dim, -1), mesh, "SplitSequence").movedim(-1, self.dim)

        _map_input(module, split)
        return module


@dataclass(frozen=True)
class GatherSequence:
    """All-gather the sequence (dim `dim`) of the module's input, or of its output with output=True:
    [b, s/tp, h] -> [b, s, h]. Backward keeps this rank's tokens of the grad (it must be the same on
    every rank: the consumer sums its input grads over tp, as column-parallel layers do)."""

    dim: int = 1
    output: bool = False

    def apply(self, module: nn.Module, name: str, mesh: Mesh) -> nn.Module:
        def gather(x):
            return comm.gather_from_tp(x.movedim(self.dim, -1), mesh, "GatherSequence").movedim(-1, self.dim)

        (_map_output if self.output else _map_input)(module, gather)
        return module


@dataclass(frozen=True)
class SequenceParallelNorm:
    """nn.LayerNorm / nn.RMSNorm / LlamaRMSNorm (any RMSNorm with `weight` and `variance_epsilon`) ->
    layers.Norm on this rank's tokens, its weight (and bias) grads summed over tp in backward."""

    def apply(self, module: nn.Module, name: str, mesh: Mesh) -> nn.Module:
        return Norm.from_dense(module, mesh, sequence_parallel=True)
