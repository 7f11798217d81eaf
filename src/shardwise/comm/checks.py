"""Ranks agree before a collective, so a mismatch is a clear error on every rank instead of a crash or silent mixing.

    check_same_shape   one small all-gather of the input's shape before an all-gather / reduce-scatter (where the
                       sequence-parallel token count may differ between ranks: gloo aborts the process on a size
                       mismatch, "Received data size doesn't match expected size", and NCCL hangs or corrupts)
                       It costs one tiny collective (~0.6 ms on gloo/CPU; on NCCL also a host sync) per checked op,
                       one per SP module forward (see shapes_agreed); SHARDWISE_CHECK_SHAPES=0 skips it once a run is
                       known good (a token-count mismatch then crashes in gloo or hangs until the timeout).
    shapes_agreed      a region (a context) inside which shape checks are skipped because every collective input's
                       shape follows from shapes already agreed in the same forward: ParallelMLP and the attention
                       check their entry all-gather and skip their exit reduce-scatter (its [s, b, h] input is made
                       from the gathered [s, b, ...] by same-shaped weights); GPT checks the ids' shape once
                       (reported as the embedding's) and runs the embedding, every block and the head inside the
                       region. So an SP forward pays one check per module call, not one per collective (GPT:
                       one per forward, not 4 per block + 2). The debug mode's fingerprints are never skipped.
                       The region vouches for shardwise's own modules only: a user's forward hook inside GPT's
                       blocks that changes token counts per rank is not checked there (use
                       SHARDWISE_DEBUG_COLLECTIVES=1).
    agree              the debug mode (SHARDWISE_DEBUG_COLLECTIVES=1 or init_mesh(debug=True)): before every
                       collective, ranks exchange a fingerprint (sequence number, op, shape, dtype, layer tag, phase,
                       call site) over the collective's own group and raise naming the first divergence

Why our own debug mode: TORCH_DISTRIBUTED_DEBUG=DETAIL (set before torch is imported) wraps gloo groups with a
fingerprint check that, in torch 2.13, catches an op or shape mismatch (checked), but not two same-shaped
collectives issued in swapped order (e.g. two layers' all-reduces): those silently add the wrong tensors. Ours
adds the layer tag and the caller's file:line, so the swap is caught and both call sites are named. It costs an
all_gather_object per collective: a debugging tool, off by default.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["SHAPE_ROW_NUMEL", "before", "check_same_shape", "debugging", "shape_checks_on", "shapes_agreed"]

_MAX_DIMS = 8  # shapes are exchanged as fixed-size int64 rows: [ndim, d0, ..., d7]
SHAPE_ROW_NUMEL = 1 + _MAX_DIMS
_sequence: dict[int, int] = {}  # id(group) -> collectives issued on it so far (debug mode)
_region = threading.local()  # .depth > 0: inside shapes_agreed (per thread: a server's threads run their own forwards)


def debugging(flag: bool = False) -> bool:
    """Whether the debug mode is on: `flag` (the mesh's debug=True) or SHARDWISE_DEBUG_COLLECTIVES=1."""
    return flag or os.environ.get("SHARDWISE_DEBUG_COLLECTIVES") == "1"


def before(
    op: str,
    source: torch.Tensor,
    group,
    group_size: int,
    tag: str,
    phase: str,
    *,
    check_shape: bool,
    debug: bool,
    shape: tuple[int, ...] | None = None,
) -> str | None:
    """What the ranks of `group` agree on before `op` is issued (events.run_collective calls this; a primitive
    that must fail before issuing calls it too, so its peers, which went on to issue, fail with it). `shape`:
    what must agree when not all of source's shape must (a row layer's input: its feature dim is a shard).
    Returns what it exchanged: "shape_check" (one all-gather of SHAPE_ROW_NUMEL int64 per rank), "debug_check"
    (all_gather_object of a fingerprint) or None (nothing: no collective issued)."""
    if group_size == 1 or group is None:
        return None
    shape = tuple(source.shape) if shape is None else tuple(shape)
    if debugging(debug):
        agree(op, shape, source.dtype, group, group_size, tag, phase)
        return "debug_check"
    if check_shape and shape_checks_on() and not getattr(_region, "depth", 0):
        check_same_shape(shape, group, group_size, f"{op} {tag!r} ({phase})")
        return "shape_check"
    return None


def shape_checks_on() -> bool:
    """Whether checked collectives agree on shapes first: on unless SHARDWISE_CHECK_SHAPES=0 (read per call)."""
    return os.environ.get("SHARDWISE_CHECK_SHAPES") != "0"


def shapes_agreed():
    """A context inside which shape checks are skipped: the caller vouches that each collective input's shape
    follows from shapes the ranks already agreed on in this forward (an earlier checked collective, then ops
    whose output shapes depend only on their input shapes and on weights of the same global shape). Only a
    module that owns that whole path enters it (nn/mlp.py, nn/attention.py, nn/gpt.py); nesting is fine.
    Under torch.compile nothing is checked anyway (every rank traces the same shapes): a null context."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else _AgreedRegion()


class _AgreedRegion:
    """Counts nesting per thread (a server's threads run their own forwards: one's region is not another's)."""

    def __enter__(self):
        _region.depth = getattr(_region, "depth", 0) + 1

    def __exit__(self, *exc):
        _region.depth -= 1


def check_same_shape(shape: tuple[int, ...], group, group_size: int, what: str) -> None:
    """Raise ValueError on every rank of `group` unless `shape` is the same on all of them. One all-gather of
    a [1 + 8] int64 row; `what` names the collective in the message (e.g. "all_gather 'mlp.up' (fwd)")."""
    if group_size == 1:
        return
    if len(shape) > _MAX_DIMS:
        raise ValueError(f"{what}: tensors of more than {_MAX_DIMS} dims are not supported, got {len(shape)}")
    row = torch.zeros(SHAPE_ROW_NUMEL, dtype=torch.int64)
    row[0] = len(shape)
    row[1 : 1 + len(shape)] = torch.tensor(shape, dtype=torch.int64)
    # NCCL moves only device tensors (one tiny copy and a sync per check); gloo takes the CPU row as it is.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else row.device
    rows = torch.empty(group_size * SHAPE_ROW_NUMEL, dtype=torch.int64, device=device)
    dist.all_gather_single(rows, row.to(device), group=group)
    shapes = [tuple(r[1 : 1 + r[0]]) for r in rows.view(group_size, -1).tolist()]
    if len(set(shapes)) == 1:
        return
    ranks = dist.get_process_group_ranks(group)
    detail = ", ".join(f"rank {rank}: {list(shape)}" for rank, shape in zip(ranks, shapes, strict=True))
    raise ValueError(
        f"{what}: the ranks' inputs differ in shape ({detail}); every rank must pass the same shape. Under "
        "sequence parallelism each rank holds s/tp tokens of the same sequence: give every rank the same "
        "sequence length, a multiple of tp, and split it with scatter_to_sp"
    )


@dataclass(frozen=True)
class _Fingerprint:
    sequence: int
    op: str
    shape: tuple[int, ...]
    dtype: str
    tag: str
    phase: str
    site: str  # file:line of the code that issued it (not comm's, not torch's)

    def describe(self) -> str:
        what = f"{self.op} {list(self.shape)} {self.dtype} tag={self.tag!r} ({self.phase})"
        return f"collective #{self.sequence}, {what}, at {self.site}"


def _call_site() -> str:
    """file:line of the innermost frame outside shardwise.comm and torch: the layer or script that issued it."""
    here = os.path.dirname(__file__)
    torch_dir = os.path.dirname(torch.__file__)
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(here) and not path.startswith(torch_dir):
            return f"{path}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"


def agree(op: str, shape: tuple[int, ...], dtype: torch.dtype, group, group_size: int, tag: str, phase: str) -> None:
    """Debug mode: every rank of `group` exchanges what it is about to issue; raise on every rank naming the
    first rank whose fingerprint differs from the lowest rank's, with both call sites."""
    if group_size == 1:
        return
    key = id(group)
    sequence = _sequence.get(key, 0)
    _sequence[key] = sequence + 1
    mine = _Fingerprint(sequence, op, shape, str(dtype).removeprefix("torch."), tag, phase, _call_site())
    prints: list[_Fingerprint | None] = [None] * group_size
    dist.all_gather_object(prints, mine, group=group)
    ranks = dist.get_process_group_ranks(group)
    for rank, other in zip(ranks[1:], prints[1:], strict=True):
        if _differs(prints[0], other):
            raise RuntimeError(
                f"collective mismatch (SHARDWISE_DEBUG_COLLECTIVES): rank {ranks[0]} issues "
                f"{prints[0].describe()}, but rank {rank} issues {other.describe()}; every rank must issue the "
                "same collectives in the same order (the same layers, called in the same order)"
            )


def _differs(a: _Fingerprint, b: _Fingerprint) -> bool:
    # The call site may legitimately differ (ranks on different code paths issuing the same collective), so it
    # is reported, not compared.
    return (a.sequence, a.op, a.shape, a.dtype, a.tag, a.phase) != (b.sequence, b.op, b.shape, b.dtype, b.tag, b.phase)
