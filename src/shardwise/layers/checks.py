"""Input checks that run the same way on every device and agree on every tp rank.

A check is a one-element bool tensor computed on the data's device and, when ranks may disagree (an
out-of-range id on one rank only), folded into a collective the layer already does, so every rank holds
the same verdict and either all raise or none does: a rank raising alone would leave the others waiting
in the next collective. On CPU the verdict raises ValueError here; on CUDA it stays on the device
(torch._assert_async: no host sync per step), failing at a later kernel launch and ending the process,
as an out-of-range index in F.embedding itself would. Under torch.compile the device-side assertion on
every device (a host bool() would break the graph): on CPU it raises a RuntimeError with the message.
"""

from __future__ import annotations

import torch


def require(ok: torch.Tensor, message: str) -> None:
    """ok: [] or [1] bool, already agreed over the ranks that must raise together -> ValueError(message)
    when False (CPU), or a device-side assertion carrying the message (CUDA and other devices)."""
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)
