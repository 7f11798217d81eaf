"""Cross-entropy over vocabulary-sharded logits, without ever holding the full logits on a rank.

Per token: loss = log(sum_j exp(z_j - m)) - (z_target - m), with m the global max. Each rank reduces
over its own columns; two all-reduces of [tokens] numbers (max, then the packed pair (target logit,
sum of exps)) replace gathering [tokens, V]. Backward is local: softmax - one_hot(target).

Ranks may hold different numbers of columns (ColumnParallelLinear's default split of 7 over 2 ranks is
4/3): each rank's first column id comes from `vocab_range`, or is learned from every rank's column count.
The max all-reduce also carries what the input checks need (every rank's range, the extreme target ids),
so a bad target on one rank raises the same error on all of them without another collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import comm
from ..mesh import Mesh, resolve
from .checks import require

_NONE = float("-inf")  # the identity of MAX: a slot this rank does not fill


def _first_column(local: int, mesh: Mesh, vocab_range, device, tag: str):
    """The global id of this rank's first column: vocab_range's start, 0 at tp=1, or else the sum of the
    lower ranks' column counts, learned with one all-reduce of [tp] numbers (kept on the device: no sync)."""
    if vocab_range is not None:
        return vocab_range[0]
    if mesh.tp_size == 1:
        return 0
    counts = torch.zeros(mesh.tp_size, dtype=torch.int64, device=device)
    counts[mesh.tp_rank] = local
    comm.all_reduce_(counts, mesh, tag, "fwd")
    return counts[: mesh.tp_rank].sum()


def _shown(x) -> str:
    """A host int, or a CPU tensor's value, for a message; a device tensor would need a sync to print."""
    # Under torch.compile a tensor's value is not known while tracing (reading it would break the graph).
    if isinstance(x, int) or (x.device.type == "cpu" and not torch.compiler.is_compiling()):
        return str(int(x))
    return "V' (the columns of all ranks)"


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, mesh, vocab_size, ignore_index, vocab_range, tag):  # noqa: PLR0913
        tp, rank, local = mesh.tp_size, mesh.tp_rank, logits.shape[-1]
        start = _first_column(local, mesh, vocab_range, logits.device, tag)  # int, or a 0-d device tensor
        ctx.logits_dtype = logits.dtype
        logits = logits.float()
        # Padded columns (ids >= vocab_size) must never win; with a learned start it is unknown on the host
        # whether this rank holds any, so the mask is applied whenever a vocab_size is given.
        if vocab_size is not None and (not isinstance(start, int) or vocab_size < start + local):
            ids = torch.arange(local, device=logits.device) + start
            logits = logits.masked_fill(ids >= vocab_size, float("-inf"))

        ignored = target == ignore_index
        # One MAX all-reduce: [tokens] maxes | max target, -min target | every rank's start, stop | width error.
        meta = torch.full((3 + 2 * tp,), _NONE, device=logits.device)
        if target.numel():  # the extreme ids, ignored tokens left out (no real target: -1 and -2**62)
            meta[0] = target.masked_fill(ignored, -1).amax()
            meta[1] = -target.masked_fill(ignored, 2**62).amin()
        meta[2 + rank] = start
        meta[2 + tp + rank] = start + local if vocab_range is None else vocab_range[1]
        meta[2 + 2 * tp] = 0.0 if vocab_range is None or vocab_range[1] - vocab_range[0] == local else 1.0
        packed = torch.cat([logits.amax(dim=-1).reshape(-1), meta])
        if tp > 1:
            comm.all_reduce_(packed, mesh, tag, "fwd", op=dist.ReduceOp.MAX)
        logits_max, meta = packed[: -meta.numel()].view(target.shape), packed[-meta.numel() :]
        _check(meta, tp, local, vocab_size, ignore_index, vocab_range)

        shifted = logits - logits_max.unsqueeze(-1)
        local_target = target - start
        here = (local_target >= 0) & (local_target < local) & ~ignored
        index = local_target.masked_fill(~here, 0).unsqueeze(-1)
        target_logit = shifted.gather(-1, index).squeeze(-1).masked_fill(~here, 0.0)
        exp = shifted.exp()
        packed = torch.stack([target_logit, exp.sum(dim=-1)])
        if tp > 1:
            comm.all_reduce_(packed, mesh, tag, "fwd")
        target_logit, sum_exp = packed[0], packed[1]
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, index, here, ignored)
        ctx.backward_done = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # The gradient is built in the saved softmax itself ([tokens, V'/tp] fp32, the largest tensor at
        # the loss): a second backward would read it overwritten, so it is refused rather than wrong.
        if ctx.backward_done:
            raise RuntimeError(
                "vocab_parallel_cross_entropy's backward cannot run a second time (retain_graph=True): it "
                "builds the gradient in its saved softmax to save that memory; compute the loss again instead"
            )
        ctx.backward_done = True
        softmax, index, here, ignored = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, index, -here.to(grad.dtype).unsqueeze(-1))
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None, None, None


def _check(meta: torch.Tensor, tp: int, local: int, vocab_size, ignore_index: int, vocab_range) -> None:
    """meta: the reduced [3 + 2 tp] (max target, -min target, starts, stops, width error), equal on every
    rank -> the same error on every rank, or none. Ids are exact in fp32 below 2**24."""
    starts, stops = meta[2 : 2 + tp], meta[2 + tp : 2 + 2 * tp]
    total = stops[-1]
    if vocab_range is not None:  # learned ranges tile the vocabulary by construction
        tiled = (starts[0] == 0) & (starts[1:] == stops[:-1]).all() & (meta[2 + 2 * tp] == 0)
        order = "the ranks' ranges must follow each other from 0 in rank order (as the column split does)"
        require(tiled, f"vocab_range must give each rank's own columns [start, start + {local}) here, and {order}")
    if vocab_size is not None:
        require(total >= vocab_size, f"vocab_size={vocab_size} exceeds the {_shown(total)} columns of all ranks")
    limit = total if vocab_size is None else vocab_size
    ok = (meta[1] <= 0) & (meta[0] < limit)  # -min target <= 0 <=> min >= 0; no real target: both -inf
    require(ok, f"target ids must lie in [0, {_shown(limit)}) or equal ignore_index={ignore_index} on every rank")


def vocab_parallel_cross_entropy(  # noqa: PLR0913
    local_logits: torch.Tensor,
    target: torch.Tensor,
    mesh: Mesh | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    *,
    vocab_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Per-token loss. local_logits: [..., V'_r] (this rank's vocabulary columns; V' = all ranks'
    columns together, the padded vocabulary), target: [...] global ids -> loss: [...] fp32, 0 where
    target == ignore_index (average over target != ignore_index for the mean, as F.cross_entropy does).
    `vocab_size`: the real vocabulary (columns >= it are padding and masked); default V'.
    `vocab_range`: (start, stop), the global ids of this rank's columns (stop - start = V'_r), e.g. a
    ColumnParallelLinear's shard; default: learned with one extra all-reduce of [tp] column counts, so
    any split in rank order works. Bad targets or ranges raise the same ValueError on every rank."""
    mesh = resolve(mesh)
    if vocab_size is not None and vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size} must be positive")
    if target.shape != local_logits.shape[:-1]:
        raise ValueError(
            f"target shape {list(target.shape)} must equal the logits' leading shape {list(local_logits.shape[:-1])}"
        )
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must hold integer class ids, got {target.dtype}")
    if vocab_range is not None:
        vocab_range = (int(vocab_range[0]), int(vocab_range[1]))
    return _VocabParallelCrossEntropy.apply(local_logits, target.long(), mesh, vocab_size, ignore_index, vocab_range,
                                            "vocab_parallel_cross_entropy")  # fmt: skip
