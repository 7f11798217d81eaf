"""A small GPT: vocabulary-parallel embedding (tied to the output layer), pre-norm parallel blocks with
rotary positions, final norm, vocabulary-parallel cross-entropy. With tp=1 it is the dense model."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .. import comm, rng
from ..layers import VocabParallelEmbedding, vocab_parallel_cross_entropy
from ..layers.embedding import TiedLMHead
from ..layers.norm import Norm
from ..mesh import Mesh, resolve
from .block import ParallelTransformerBlock

IGNORE_INDEX = -100  # targets equal to it add no loss (padding, prompt tokens), as in PyTorch and Hugging Face


@dataclass
class GPTConfig:
    vocab_size: int = 256
    hidden: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    ffn_hidden: int | None = None
    activation: str = "gelu"
    norm: str = "layernorm"
    bias: bool = True
    dropout: float = 0.0
    sequence_parallel: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class GPT(nn.Module):
    """ids: [b, s] -> local logits [b, s, V'/tp] (V' = vocab padded to a multiple of tp), or with
    targets [b, s]: the mean next-token loss over the targets != IGNORE_INDEX (a scalar, equal on every tp
    rank; nan when every target is ignored, like F.cross_entropy)."""

    def __init__(self, config: GPTConfig, mesh: Mesh | None = None, device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.mesh = resolve(mesh)
        sp = config.sequence_parallel
        self.embed = VocabParallelEmbedding(config.vocab_size, config.hidden, self.mesh, sequence_parallel=sp,
                                            init_std=0.02, device=device, dtype=dtype)  # fmt: skip
        self.blocks = nn.ModuleList(
            ParallelTransformerBlock(
                config.hidden,
                config.num_heads,
                config.ffn_hidden,
                config.num_kv_heads,
                activation=config.activation,
                norm=config.norm,
                bias=config.bias,
                rope=True,
                dropout=config.dropout,
                sequence_parallel=sp,
                mesh=self.mesh,
                device=device,
                dtype=dtype,
            )  # fmt: skip
            for _ in range(config.num_layers)
        )
        self.norm = Norm(config.hidden, config.norm, sequence_parallel=sp, mesh=self.mesh, device=device, dtype=dtype)
        # Output layer tied to the embedding, column-parallel over the vocabulary; the gathered SP input is
        # already "entered" (its backward reduce-scatter sums the grads), so the head adds no collective then.
        # Held outside the module tree so the state_dict keeps its v0.1 keys (no "lm_head.weight" alias).
        self._lm_head = (TiedLMHead(self.embed, gather_output=False, input_entered=sp),)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None, caches=None) -> torch.Tensor:
        """caches: one attention.KVCache per block, extended in place (generation; see generation.py)."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be [batch, seq], got shape {list(ids.shape)}")
        cfg, mesh = self.config, self.mesh
        if cfg.sequence_parallel and not torch.compiler.is_compiling():  # (compiled: every rank traces one shape)
            # the ranks agree on the ids' shape first (one tiny all-gather, reported as the embedding's): every
            # later collective's shape follows from it, so the rest of the forward runs unchecked
            # (comm.checks.shapes_agreed), and a length tp does not divide raises below on every rank alike
            comm.before("reduce_scatter", ids, mesh.tp_group, mesh.tp_size, self.embed.tag, "fwd", check_shape=True,
                        debug=mesh.debug)  # fmt: skip
        if cfg.sequence_parallel and ids.shape[1] % mesh.tp_size:
            raise ValueError(
                f"sequence_parallel splits the sequence ({ids.shape[1]} tokens) over tp={mesh.tp_size}; "
                f"use a sequence length that is a multiple of {mesh.tp_size}"
            )
        if caches is not None and (cfg.sequence_parallel or len(caches) != len(self.blocks)):
            raise ValueError("caches need one KVCache per block and sequence_parallel=False (decode tokens one by one)")
        with comm.checks.shapes_agreed():  # every SP collective's input: [s or s/tp, b, ...] of the agreed ids
            x = self.embed(ids.t())  # [s, b, h] (sequence-parallel: [s/tp, b, h])
            x = rng.dropout(x, cfg.dropout, self.training, mesh, sharded=cfg.sequence_parallel)
            for i, block in enumerate(self.blocks):
                x = block(x, None if caches is None else caches[i])
            x = self.norm(x)
            if cfg.sequence_parallel:  # the lm_head's input collective: all-gather | reduce-scatter
                x = comm.gather_from_sp(x, mesh, "lm_head")
            head = self._lm_head[0]
            head.weight = self.embed.weight  # re-tied each call: a load or .to() may have replaced the Parameter
            logits = head(x)  # [s, b, V'/tp], tied to the embedding
        if targets is None:
            return logits.transpose(0, 1)
        if targets.shape != ids.shape:
            raise ValueError(f"targets shape {list(targets.shape)} must equal ids shape {list(ids.shape)}")
        start = self.embed.vocab_start  # the head's columns are the table's rows: no all-reduce to learn them
        vocab_range = (start, start + self.embed.rows_per_rank)
        loss = vocab_parallel_cross_entropy(logits, targets.t(), mesh, vocab_size=cfg.vocab_size,
                                            ignore_index=IGNORE_INDEX, vocab_range=vocab_range)  # fmt: skip
        # The mean over the targets that count, as F.cross_entropy: all ignored gives 0 / 0 = nan. Every rank
        # holds all tokens here (under SP the head's input was gathered), so this count is the global one.
        return loss.sum() / (targets != IGNORE_INDEX).sum()

    def full_logits(self, local_logits: torch.Tensor) -> torch.Tensor:
        """[b, s, V'/tp] -> [b, s, vocab_size]: gathered over tp, padding dropped (collective)."""
        return comm.gather_from_tp(local_logits, self.mesh, "full_logits")[..., : self.config.vocab_size]
