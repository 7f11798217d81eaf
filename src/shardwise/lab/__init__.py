"""The fabric lab: emulated multi-node clusters on one Linux host (network namespaces, a bridge, tc-shaped links)
running real torchrun jobs. Needs root (CAP_NET_ADMIN).

    from shardwise.lab import Fabric
    with Fabric(nodes=2, rate="100mbit") as fab:
        res = fab.torchrun(["python", "train.py"], procs_per_node=2)
"""

from .fabric import Fabric
from .inventory import FabricInfo, clean, list_fabrics
from .runner import LabResult
from .system import LabConfigError, LabError, format_rate, parse_rate

__all__ = [
    "Fabric",
    "FabricInfo",
    "LabConfigError",
    "LabError",
    "LabResult",
    "clean",
    "format_rate",
    "list_fabrics",
    "parse_rate",
]
