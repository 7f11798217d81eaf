"""LayerNorm / RMSNorm whose parameters are replicated on every tp rank.

Under sequence parallelism each rank normalises different tokens, so each rank's parameter grad is
a partial sum: comm.replicated_params records them, and the mesh's one coalesced all-reduce per backward
(comm.grad_sync, shared with every other replicated parameter) sums them over tp."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import comm
from ..mesh import Mesh, resolve


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last dim, its parameters whole on every tp rank.

    x: [..., hidden] -> same. kind: 'layernorm' (weight, bias) or 'rmsnorm' (weight).
    sequence_parallel=True (exported as shardwise.SequenceParallelNorm): x holds only this rank's
    tokens ([s/tp, b, hidden] or [b, s/tp, hidden]: any leading dims), so the weight/bias grads are
    partial sums and are summed over tp in backward. `Norm.from_dense(nn.LayerNorm | nn.RMSNorm |
    LlamaRMSNorm, mesh, sequence_parallel=True)` converts a dense norm with its weights."""

    def __init__(self, hidden: int, kind: str = "layernorm", eps: float = 1e-5, sequence_parallel: bool = False,
                 mesh: Mesh | None = None, device=None, dtype: torch.dtype = torch.float32):  # fmt: skip
        super().__init__()
        if kind not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm kind must be 'layernorm' or 'rmsnorm', got {kind!r}")
        self.mesh = resolve(mesh)
        self.kind, self.eps, self.sequence_parallel = kind, eps, sequence_parallel
        device = device if device is not None else self.mesh.device
        self.weight = nn.Parameter(torch.ones(hidden, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(hidden, device=device, dtype=dtype)) if kind == "layernorm" else None
        self.tag = type(self).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = [self.weight] if self.bias is None else [self.weight, self.bias]
        if self.sequence_parallel:
            params = comm.replicated_params(params, self.mesh, self.tag)
        if self.kind == "rmsnorm":
            return F.rms_norm(x, x.shape[-1:], params[0], self.eps)
        return F.layer_norm(x, x.shape[-1:], params[0], params[1] if len(params) > 1 else None, self.eps)

    def replicated_grad_parameters(self) -> list[nn.Parameter]:
        """The parameters whose grads the coalesced sync sums over tp (data_parallel.wrap_ddp leaves them to it)."""
        if not self.sequence_parallel or self.mesh.tp_size == 1:
            return []
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    @classmethod
    def from_dense(cls, norm: nn.Module, mesh: Mesh | None = None, sequence_parallel: bool = True) -> Norm:
        """The same norm with the same weights: nn.LayerNorm (bias optional), nn.RMSNorm, or a Hugging Face
        RMSNorm (LlamaRMSNorm and kin: `weight` and `variance_epsilon`, computed in fp32 like F.rms_norm)."""
        if isinstance(norm, nn.LayerNorm):
            kind, eps = "layernorm", norm.eps
        elif isinstance(norm, nn.RMSNorm):
            kind, eps = "rmsnorm", norm.eps
        elif hasattr(norm, "variance_epsilon") and isinstance(getattr(norm, "weight", None), torch.Tensor):
            kind, eps = "rmsnorm", norm.variance_epsilon
        else:
            raise TypeError(f"expected nn.LayerNorm, nn.RMSNorm or an RMSNorm with variance_epsilon, got "
                            f"{type(norm).__name__}")  # fmt: skip
        weight = getattr(norm, "weight", None)
        if weight is None or weight.dim() != 1:
            raise ValueError(f"{type(norm).__name__}: only a norm over the last dim with a weight can be converted")
        new = cls(weight.shape[0], kind, eps, sequence_parallel, mesh, device="meta", dtype=weight.dtype)
        new.weight = nn.Parameter(weight.detach().clone().to(new.mesh.device))
        bias = getattr(norm, "bias", None) if kind == "layernorm" else None
        new.bias = None if bias is None else nn.Parameter(bias.detach().clone().to(new.mesh.device))
        return new
