"""Collectives of tensor parallelism and what observers see of them.

`collectives`: the autograd duals (copy_to_tp/reduce_from_tp, gathers, scatters, the SP pair), blocking
and async, all through one choke point. `events`: the observer API (CollectiveEvent, ComputeEvent,
add_observer), the profiler's only window on communication.
"""

from .collectives import *  # noqa: F403
from .collectives import __all__ as _collectives_all
from .events import *  # noqa: F403
from .events import __all__ as _events_all

__all__ = [*_collectives_all, *_events_all]
