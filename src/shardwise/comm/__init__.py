"""Collectives of tensor parallelism and what observers see of them.

`collectives`: the autograd duals (copy_to_tp/reduce_from_tp, gathers, scatters, the SP pair), blocking
and async, all through one choke point. `events`: the observer API (CollectiveEvent, ComputeEvent,
add_observer), the profiler's only window on communication. `grad_sync`: the replicated (sequence-parallel)
parameters' grads summed by one coalesced async all-reduce per backward. `checks`: what ranks agree on before a
collective (same shapes; in debug mode the same op, tag and order), so mismatches raise on every rank.
"""

from .checks import check_same_shape, debugging
from .collectives import *  # noqa: F403
from .collectives import __all__ as _collectives_all
from .events import *  # noqa: F403
from .events import __all__ as _events_all
from .grad_sync import *  # noqa: F403
from .grad_sync import __all__ as _grad_sync_all

__all__ = ["check_same_shape", "debugging", *_collectives_all, *_events_all, *_grad_sync_all]
