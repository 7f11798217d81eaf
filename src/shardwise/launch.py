"""Run a function on N local ranks: fresh processes, torchrun's environment variables, gloo.

The rank function calls `shardwise.init_mesh(...)` itself, exactly as it would under torchrun, so the
same function runs unchanged under both.

Ranks are forked from a fork server (multiprocessing's "forkserver") that imported torch and shardwise once:
a spawned rank pays the interpreter start and `import torch` every time (2-5 s per launch on a 2-core box), a
fork-served one about 0.1 s after the server's first start. The server is a clean interpreter started on first
use (no threads, no process group: safe to fork); each rank gets the launcher's CURRENT environment, not the
server's, and re-reads TORCH_DISTRIBUTED_DEBUG from it; settings that libraries read once at import (OpenMP/MKL
variables other than the thread count set here) come from the server's start. SHARDWISE_START_METHOD=spawn goes
back to spawning (and is what platforms without fork servers use).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import queue
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

__all__ = ["launch", "RankFailure", "free_port"]


class RankFailure(RuntimeError):
    """A rank failed in a way that could not be re-raised as its own exception (death, signal)."""


class _RemoteTraceback(Exception):
    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    # A rank must not outlive the launcher: if the parent is SIGKILLed, Linux kills us too.
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


_PRELOAD = ["torch", "torch.distributed", "shardwise"]


def _context():
    """The multiprocessing context ranks start from: a fork server with torch and shardwise imported (see the
    module doc), or spawn where there is none or SHARDWISE_START_METHOD=spawn asks for it."""
    method = os.environ.get("SHARDWISE_START_METHOD", "forkserver")
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"SHARDWISE_START_METHOD must be 'forkserver' or 'spawn', got {method!r}")
    if method == "forkserver" and "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)  # read when the server starts (first use); later calls are no-ops
        return ctx
    return mp.get_context("spawn")


def _rank_main(rank: int, world_size: int, env: dict[str, str], fn, args, results) -> None:
    _die_with_parent()
    os.environ.clear()  # the launcher's environment now (a fork server's own is the one it started with)
    os.environ.update(env)
    import torch.distributed as dist

    # read by `import torch.distributed`, which ran in the fork server: re-read from the launcher's environment
    dist.set_debug_level_from_env()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    try:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        value = fn(*args)
        results.put((rank, "ok", pickle.dumps(value), time.time()))
    except BaseException as exc:  # noqa: BLE001 - everything must reach the launcher
        text = "".join(traceback.format_exception(exc))
        try:
            payload = pickle.dumps(exc)
            pickle.loads(payload)
        except Exception:
            payload = None
        results.put((rank, "error", (payload, text), time.time()))
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def launch(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float | None = None,
           comm_timeout_s: float = 120.0) -> list[Any]:  # fmt: skip
    """Run `fn(*args)` on `world_size` local processes; return the per-rank results, rank order.

    `fn` must be importable (module level) because ranks are spawned. The first rank to fail has its
    exception re-raised here with its traceback; the other ranks are killed. `timeout_s`: the whole run
    (None: no limit). `comm_timeout_s`: what init_mesh uses when not given timeout_s (SHARDWISE_TIMEOUT_S in
    the ranks): the rendezvous (a rank that never calls init_mesh is named after it) and each collective.
    120 s by default: local ranks that have not joined or answered by then are stuck, not slow.
    """
    __tracebackhide__ = True
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if not comm_timeout_s > 0:
        raise ValueError(f"comm_timeout_s must be a positive number of seconds, got {comm_timeout_s!r}")
    env = {
        **os.environ,
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "SHARDWISE_TIMEOUT_S": str(float(comm_timeout_s)),
    }
    if "GLOO_SOCKET_IFNAME" not in os.environ and sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    ctx = _context()
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_main, args=(rank, world_size, env, fn, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()

    values: dict[int, Any] = {}
    errors: dict[int, tuple[float, Any]] = {}  # rank -> (time, (pickled exception, traceback text))
    deaths: dict[int, int] = {}  # rank -> exit code, for ranks that died without reporting

    def poll(wait: float) -> None:
        try:
            rank, status, payload, stamp = results.get(timeout=wait)
        except queue.Empty:
            for rank, proc in enumerate(procs):
                if proc.exitcode not in (None, 0) and rank not in values and rank not in errors:
                    deaths[rank] = proc.exitcode
            return
        if status == "ok":
            values[rank] = pickle.loads(payload)
        else:
            errors[rank] = (stamp, payload)

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while len(values) < world_size and not errors and not deaths:
            poll(0.05)
            if deadline is not None and time.monotonic() > deadline:
                missing = sorted(set(range(world_size)) - set(values))
                raise TimeoutError(f"launch: ranks {missing} did not finish within {timeout_s} s")
        if errors or deaths:
            # A rank's crash makes its peers fail inside collectives a moment later; keep listening
            # briefly so the root cause is the one reported, not a peer's "connection reset".
            grace = time.monotonic() + 1.0
            while time.monotonic() < grace and len(errors) + len(deaths) + len(values) < world_size:
                poll(0.05)
            busy = sorted(set(range(world_size)) - set(values) - set(errors) - set(deaths))
            _raise_root_cause(errors, deaths, busy)
        for proc in procs:  # ranks that reported are only tearing down their process group
            proc.join(timeout=10.0)
        return [values[rank] for rank in range(world_size)]
    finally:
        _reap(procs)


def _raise_root_cause(errors: dict[int, tuple[float, Any]], deaths: dict[int, int], busy: list[int]) -> None:
    """A rank that died without a word (signal, os._exit) is the root cause: its peers' errors are
    the consequence. Otherwise the earliest exception raised is. Ranks still busy then (neither done
    nor failed) are named: a collective timeout on one rank usually means another one stalled."""
    __tracebackhide__ = True  # pytest: show the rank's traceback, not the launcher's locals
    others = ", ".join(f"rank {r}" for r in sorted(errors)) or "none"
    if deaths:
        rank, code = min(deaths.items())
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        raise RankFailure(f"rank {rank} {how} without reporting an error (ranks that failed after it: {others})")
    rank, (_, (exc_bytes, text)) = min(errors.items(), key=lambda item: item[1][0])
    exc = pickle.loads(exc_bytes) if exc_bytes is not None else RankFailure(f"rank {rank} failed:\n{text}")
    exc.add_note(f"(raised on rank {rank} of a shardwise.launch)")
    if busy:
        exc.add_note(f"(ranks {busy} were still running, neither finished nor failed: stalled?)")
    raise exc from _RemoteTraceback(f"\n\n--- traceback of rank {rank} ---\n{text}")


def _reap(procs) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    stop = time.monotonic() + 5.0
    for proc in procs:
        proc.join(timeout=max(0.0, stop - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
