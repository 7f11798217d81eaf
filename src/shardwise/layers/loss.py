"""Cross-entropy over vocabulary-sharded logits, without ever holding the full logits on a rank.

Per token: loss = log(sum_j exp(z_j - m)) - (z_target - m), with m the global max. Each rank reduces
over its own slice; two all-reduces of [tokens] numbers (max, then the packed pair (target logit,
sum of exps)) replace gathering [tokens, V]. Backward is local: softmax - one_hot(target).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import comm
from ..mesh import Mesh, resolve


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, mesh, vocab_size, ignore_index, tag):
        local_vocab = logits.shape[-1]
        vocab_start = mesh.tp_rank * local_vocab
        ctx.logits_dtype = logits.dtype
        logits = logits.float()
        if vocab_size < vocab_start + local_vocab:  # padded columns must never win
            logits = logits.clone()
            logits[..., max(0, vocab_size - vocab_start) :] = float("-inf")
        logits_max = logits.amax(dim=-1)
        if mesh.tp_size > 1:
            comm.all_reduce_(logits_max, mesh, tag, "fwd", op=dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)

        ignored = target == ignore_index
        local_target = target - vocab_start
        here = (local_target >= 0) & (local_target < local_vocab) & ~ignored
        index = local_target.masked_fill(~here, 0).unsqueeze(-1)
        target_logit = shifted.gather(-1, index).squeeze(-1).masked_fill(~here, 0.0)
        exp = shifted.exp()
        packed = torch.stack([target_logit, exp.sum(dim=-1)])
        if mesh.tp_size > 1:
            comm.all_reduce_(packed, mesh, tag, "fwd")
        target_logit, sum_exp = packed[0], packed[1]
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, index, here, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, index, here, ignored = ctx.saved_tensors
        grad = softmax  # reused in place: the saved softmax is not needed again
        grad.scatter_add_(-1, index, -here.to(grad.dtype).unsqueeze(-1))
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    mesh: Mesh | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token loss. local_logits: [..., V'/tp] (this rank's vocabulary columns, V' = padded
    vocabulary), target: [...] global ids -> loss: [...] fp32, 0 where target == ignore_index.
    `vocab_size`: the real vocabulary (columns >= it are padding and masked); default V'."""
    mesh = resolve(mesh)
    padded = local_logits.shape[-1] * mesh.tp_size
    vocab_size = padded if vocab_size is None else vocab_size
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size={vocab_size} must lie in (0, {padded}] for logits of {padded} columns")
    if target.shape != local_logits.shape[:-1]:
        raise ValueError(
            f"target shape {list(target.shape)} must equal the logits' leading shape {list(local_logits.shape[:-1])}"
        )
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must hold integer class ids, got {target.dtype}")
    if not target.is_cuda:
        real = target[target != ignore_index]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab_size):
            raise ValueError(f"target ids must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}")
    return _VocabParallelCrossEntropy.apply(local_logits, target.long(), mesh, vocab_size, ignore_index,
                                            "vocab_parallel_cross_entropy")  # fmt: skip
