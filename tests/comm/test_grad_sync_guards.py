"""comm.replicated_params under torch.compile: the traced path sums the replicated grads over tp only, and
wrap_ddp leaves those parameters out of DDP, so with dp > 1 the dp replicas would drift apart silently; it must
refuse, naming the way out, and stay the traceable tp sum with dp = 1."""

import pytest
import torch

from shardwise.comm import replicated_params
from shardwise.mesh import Mesh


def test_compiled_sequence_parallel_with_dp_refuses_and_with_dp1_traces(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    weight = torch.nn.Parameter(torch.ones(4))
    with_dp = Mesh(tp_size=2, tp_rank=0, dp_size=2, dp_rank=0)
    with pytest.raises(NotImplementedError, match="dp > 1 under torch.compile.*run this model eagerly, or with dp=1"):
        replicated_params([weight], with_dp, "norm")
    (out,) = replicated_params([weight], Mesh(tp_size=2, tp_rank=0, dp_size=1, dp_rank=0), "norm")
    assert out.grad_fn is not None and torch.equal(out, weight)  # copy_params_to_tp's autograd node
