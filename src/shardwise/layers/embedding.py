"""Vocabulary-parallel embedding: rank i holds rows [i*V'/tp, (i+1)*V'/tp) of the table, where V' is
the vocabulary padded up to a multiple of tp. Padded rows are zero, never looked up, and masked out
of the loss (see loss.py), so they never win an argmax.

Communication, forward | backward: all-reduce of the looked-up rows | none
(sequence_parallel: reduce-scatter over tokens | all-gather). The rows carry one extra column, the
out-of-range-id verdict, so that every rank raises when any one saw a bad id (checks.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import comm
from ..initialization import make_param, normal_fill
from ..mesh import Mesh, resolve
from ..sharding import ShardSpec, copy_shard_info, set_shard_info
from .checks import require


def padded_vocab(num_embeddings: int, tp_size: int) -> int:
    return -(-num_embeddings // tp_size) * tp_size


class VocabParallelEmbedding(nn.Module):
    """ids: [...] int64 in [0, num_embeddings) -> [..., embedding_dim] replicated (sequence_parallel:
    ids [s, ...] -> [s/tp, ..., embedding_dim], this rank's tokens). weight: [V'/tp, embedding_dim]."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        mesh: Mesh | None = None,
        *,
        sequence_parallel: bool = False,
        padding_idx: int | None = None,
        init_std: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.mesh = resolve(mesh)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padded_num_embeddings = padded_vocab(num_embeddings, self.mesh.tp_size)
        self.rows_per_rank = self.padded_num_embeddings // self.mesh.tp_size
        self.vocab_start = self.mesh.tp_rank * self.rows_per_rank
        self.sequence_parallel = sequence_parallel
        if padding_idx is not None and not 0 <= padding_idx < num_embeddings:
            raise ValueError(f"padding_idx={padding_idx} must lie in [0, {num_embeddings})")
        # nn.Embedding semantics: the padding row gets no gradient. Only the rank holding it knows.
        self.padding_idx = padding_idx
        local_pad = None if padding_idx is None else padding_idx - self.vocab_start
        self._local_padding_idx = local_pad if local_pad is not None and 0 <= local_pad < self.rows_per_rank else None
        self.tag = type(self).__name__
        device = device if device is not None else self.mesh.device
        # Drawn over the real vocabulary only, so the table does not depend on tp; padding stays zero.
        real_rows = max(0, min(self.rows_per_rank, num_embeddings - self.vocab_start))
        spec = ShardSpec(0, ((self.vocab_start, self.vocab_start + real_rows),), num_embeddings)
        real = make_param((num_embeddings, embedding_dim), normal_fill(init_std), spec, dtype, device)
        weight = torch.zeros((self.rows_per_rank, embedding_dim), dtype=dtype, device=device)
        weight[:real_rows] = real.detach()
        self.weight = nn.Parameter(weight)
        rows = ((self.vocab_start, self.vocab_start + self.rows_per_rank),)
        set_shard_info(self.weight, ShardSpec(0, rows, self.padded_num_embeddings, valid=num_embeddings))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{self.tag}: ids must be int64 or int32, got {ids.dtype}")
        # Checked on the device, on every device (see checks.py); the message is the same on every rank.
        bad = ((ids < 0) | (ids >= self.num_embeddings)).any()
        message = (
            f"{self.tag}: token ids must lie in [0, {self.num_embeddings}); a tp rank got one outside it "
            "(check the tokenizer against num_embeddings, and that every tp rank gets the same ids)"
        )
        if self.mesh.tp_size == 1:
            require(~bad, message)
            return F.embedding(ids, self.weight, self._local_padding_idx)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        rows = F.embedding(local.masked_fill(outside, 0), self.weight, self._local_padding_idx)
        rows = rows.masked_fill(outside.unsqueeze(-1), 0.0)
        # The verdict rides the all-reduce (or reduce-scatter) as one extra column, set on every token of
        # a rank that saw a bad id: after the sum each rank's tokens carry it, so all raise or none does.
        rows = torch.cat([rows, bad.to(rows.dtype).expand(*rows.shape[:-1], 1)], dim=-1)
        if self.sequence_parallel:
            out = comm.reduce_scatter_to_sp(rows, self.mesh, self.tag)
        else:
            out = comm.reduce_from_tp(rows, self.mesh, self.tag)
        require(out[..., -1].eq(0).all(), message)
        return out[..., :-1].contiguous()  # contiguous: callers may .view() it, as they could before

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, mesh: Mesh | None = None, **kwargs) -> VocabParallelEmbedding:
        """This rank's rows of a dense nn.Embedding (weight [V, d]), zero-padded to V'/tp rows."""
        kwargs.setdefault("padding_idx", embedding.padding_idx)
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, mesh=mesh, device="meta",
                    dtype=embedding.weight.dtype, **kwargs)  # fmt: skip
        dense = embedding.weight.detach()
        weight = dense.new_zeros((layer.rows_per_rank, layer.embedding_dim))
        real = dense[layer.vocab_start : layer.vocab_start + layer.rows_per_rank]
        weight[: real.shape[0]] = real
        old = layer.weight
        layer.weight = copy_shard_info(old, nn.Parameter(weight.to(layer.mesh.device)))
        return layer

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings} (padded {self.padded_num_embeddings}, rows {self.vocab_start}:"
            f"{self.vocab_start + self.rows_per_rank}), {self.embedding_dim}, tp={self.mesh.tp_size}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


class TiedLMHead(nn.Module):
    """The output layer sharing a VocabParallelEmbedding's table: column-parallel over the vocabulary.

    x: [..., d] replicated -> logits [..., vocab] (gather_output, padding dropped) or this rank's
    [..., V'/tp] columns (feed those to vocab_parallel_cross_entropy: nothing is gathered)."""

    def __init__(self, embedding: VocabParallelEmbedding, gather_output: bool = True, bias: torch.Tensor | None = None,
                 input_entered: bool = False):  # fmt: skip
        """bias: [vocab] (the dense output layer's, e.g. BERT's MLM decoder), replicated. input_entered: x has
        already been through the tp region's entry (comm.gather_from_sp under sequence parallelism), so no
        copy_to_tp here."""
        super().__init__()
        self.input_entered = input_entered
        if embedding.sequence_parallel and not input_entered:
            raise ValueError("TiedLMHead expects replicated input; gather the sequence-parallel tokens first")
        if bias is not None and not gather_output:
            raise ValueError("a tied output layer with a bias needs gather_output=True (the bias spans the vocab)")
        # Replicated, added after the gather ([vocab] is small). Kept as the dense Parameter itself:
        # it may be tied too (BERT's cls.predictions.bias is decoder.bias).
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias.detach().clone())
        self.bias = bias
        # The very same Parameter as the embedding's (as in the dense model): one tensor, updated once,
        # and the state_dict keeps both names like the dense one does.
        self.weight = embedding.weight
        self.vocab_size = embedding.num_embeddings
        self.mesh, self.gather_output = embedding.mesh, gather_output
        self.tag = type(self).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_entered:
            x = comm.copy_to_tp(x, self.mesh, self.tag)
        logits = comm.timed_compute(self.tag, F.linear, x, self.weight)
        if not self.gather_output:
            return logits
        logits = comm.gather_from_tp(logits, self.mesh, self.tag)[..., : self.vocab_size]
        return logits if self.bias is None else logits + self.bias
