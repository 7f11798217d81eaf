"""LayerNorm / RMSNorm whose parameters are replicated on every tp rank.

Under sequence parallelism each rank normalises different tokens, so each rank's parameter grad is
a partial sum: copy_params_to_tp sums them over tp in backward (one all-reduce per norm)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import comm
from ..mesh import Mesh, resolve


class Norm(nn.Module):
    """x: [..., hidden] -> same. kind: 'layernorm' (weight, bias) or 'rmsnorm' (weight)."""

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
            params = comm.copy_params_to_tp(params, self.mesh, self.tag)
        if self.kind == "rmsnorm":
            return F.rms_norm(x, x.shape[-1:], params[0], self.eps)
        return F.layer_norm(x, x.shape[-1:], params[0], params[1], self.eps)
