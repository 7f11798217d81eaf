"""Megatron MLP forward+backward: shardwise vs a minimal hand-written reference vs DTensor vs
megatron-core (and fairscale), all in ONE torchrun on the same 2 gloo ranks, interleaved step by step.

    OMP_NUM_THREADS=1 THP_MEM_ALLOC_ENABLE=1 PYTHONPATH=/tmp/benchdeps \
        torchrun --nproc_per_node 2 bench/mlp.py

megatron-core and fairscale are optional: installed with
    pip install --no-deps --target /tmp/benchdeps megatron-core==0.16.1 fairscale==0.4.13
and found through PYTHONPATH; an implementation that does not import is skipped (and said so).

The model: x [tokens, h] -> column-parallel h->4h (+bias), GELU, row-parallel 4h->h (+bias), fp32.
mode tp: x and y replicated on the tp ranks (one all-reduce forward, one backward).
mode sp: sequence parallel, x and y are this rank's tokens [tokens/tp, h] (all-gather + reduce-scatter
forward, and the reverse backward).
tp1: every rank runs the model alone (tp=1, no communication) at the same time: the per-call cost
of each library with no collective to hide it.

Every implementation gets its weights from the same dense nn.Linear pair (same seed on every rank) and
is checked once against the dense model (y, dx and all parameter grads, max abs error printed) before
it is timed. One timed step = zero grads (untimed), barrier (untimed), forward, backward with a fixed
upstream grad, read one element of y and of dx (timed). Step times are max-reduced over the ranks
(outside the timed region); medians and p90 are over steps. Implementations run round-robin, the
starting one rotating every round, so drift of the shared machine hits them all alike.
"""

from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch allocates anything
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import shardwise  # noqa: E402

warnings.filterwarnings("ignore")

# ---- the minimal hand-written reference ---------------------------------------------------------


class _CopyToTP(torch.autograd.Function):
    """fwd identity, bwd all-reduce (Megatron's f)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    """fwd all-reduce, bwd identity (Megatron's g)."""

    @staticmethod
    def forward(ctx, x, group):
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def _gather0(x, group, size):
    out = x.new_empty((x.shape[0] * size, *x.shape[1:]))
    dist.all_gather_single(out, x.contiguous(), group=group)
    return out


def _reduce_scatter0(x, group, size):
    out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
    dist.reduce_scatter_single(out, x.contiguous(), group=group)
    return out


class _GatherFromSP(torch.autograd.Function):
    """fwd all-gather of the tokens, bwd reduce-scatter."""

    @staticmethod
    def forward(ctx, x, group, size):
        ctx.group, ctx.size = group, size
        return _gather0(x, group, size)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter0(g, ctx.group, ctx.size), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    """fwd reduce-scatter of the tokens, bwd all-gather."""

    @staticmethod
    def forward(ctx, x, group, size):
        ctx.group, ctx.size = group, size
        return _reduce_scatter0(x, group, size)

    @staticmethod
    def backward(ctx, g):
        return _gather0(g, ctx.group, ctx.size), None, None


class _SumGrad(torch.autograd.Function):
    """fwd identity, bwd all-reduce: the row layer's bias under SP sees other tokens on each rank."""

    @staticmethod
    def forward(ctx, b, group):
        ctx.group = group
        return b.view_as(b)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class MinimalMLP(nn.Module):
    def __init__(self, up: nn.Linear, down: nn.Linear, rank: int, size: int, group, sp: bool):
        super().__init__()
        n = up.out_features // size
        cols = slice(rank * n, (rank + 1) * n)
        self.w1 = nn.Parameter(up.weight.detach()[cols].clone())
        self.b1 = nn.Parameter(up.bias.detach()[cols].clone())
        self.w2 = nn.Parameter(down.weight.detach()[:, cols].clone())
        self.b2 = nn.Parameter(down.bias.detach().clone())
        self.group, self.size, self.sp = group, size, sp

    def forward(self, x):
        group, size = self.group, self.size
        if size == 1:
            return F.linear(F.gelu(F.linear(x, self.w1, self.b1)), self.w2, self.b2)
        if self.sp:
            x = _GatherFromSP.apply(x, group, size)
            z = F.linear(F.gelu(F.linear(x, self.w1, self.b1)), self.w2)
            return _ReduceScatterToSP.apply(z, group, size) + _SumGrad.apply(self.b2, group)
        x = _CopyToTP.apply(x, group)
        z = F.linear(F.gelu(F.linear(x, self.w1, self.b1)), self.w2)
        return _ReduceFromTP.apply(z, group) + self.b2


# ---- the others ----------------------------------------------------------------------------------


class DenseMLP(nn.Module):
    def __init__(self, up: nn.Linear, down: nn.Linear):
        super().__init__()
        self.up = nn.Linear(up.in_features, up.out_features)
        self.down = nn.Linear(down.in_features, down.out_features)
        self.load_state_dict(
            {"up.weight": up.weight, "up.bias": up.bias, "down.weight": down.weight, "down.bias": down.bias}
        )

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def shardwise_mlp(up, down, mesh, sp):
    h, f = up.in_features, up.out_features
    mlp = shardwise.ParallelMLP(h, f, "gelu", sequence_parallel=sp, mesh=mesh, device="meta")
    mlp.up = shardwise.ColumnParallelLinear.from_dense(up, mesh=mesh, sequence_parallel=sp)
    mlp.down = shardwise.RowParallelLinear.from_dense(down, mesh=mesh, sequence_parallel=sp)
    return mlp


def dtensor_mlp(up, down, device_mesh, sp):
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = DenseMLP(up, down)
    if sp:
        plan = {"up": ColwiseParallel(input_layouts=Shard(0)), "down": RowwiseParallel(output_layouts=Shard(0))}
    else:
        plan = {"up": ColwiseParallel(), "down": RowwiseParallel()}
    return parallelize_module(model, device_mesh, plan)


_MEGATRON_PATCHED = False


def _patch_megatron_for_cpu():
    global _MEGATRON_PATCHED
    if _MEGATRON_PATCHED:
        return
    from megatron.core import parallel_state
    from megatron.core.utils import GlobalMemoryBuffer

    # megatron-core allocates SP buffers on torch.cuda.current_device(); there is no CUDA here.
    torch.cuda.current_device = lambda: torch.device("cpu")
    if getattr(parallel_state, "_GLOBAL_MEMORY_BUFFER", None) is None:
        parallel_state._GLOBAL_MEMORY_BUFFER = GlobalMemoryBuffer()
    _MEGATRON_PATCHED = True


class MegatronMLP(nn.Module):
    def __init__(self, up, down, rank, size, group, sp):
        super().__init__()
        from megatron.core.model_parallel_config import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        _patch_megatron_for_cpu()
        config = ModelParallelConfig(
            tensor_model_parallel_size=size,
            sequence_parallel=sp,
            use_cpu_initialization=True,
            perform_initialization=False,
            gradient_accumulation_fusion=False,
            params_dtype=torch.float32,
        )
        h, f = up.in_features, up.out_features
        ident = lambda w: w  # noqa: E731
        self.up = ColumnParallelLinear(
            h, f, config=config, init_method=ident, bias=True, gather_output=False, tp_group=group
        )
        self.down = RowParallelLinear(
            f,
            h,
            config=config,
            init_method=ident,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=group,
        )
        n = f // size
        cols = slice(rank * n, (rank + 1) * n)
        with torch.no_grad():
            self.up.weight.copy_(up.weight[cols])
            self.up.bias.copy_(up.bias[cols])
            self.down.weight.copy_(down.weight[:, cols])
            self.down.bias.copy_(down.bias)

    def forward(self, x):  # x: [s, 1, h] (megatron's layers want [s, b, h])
        y, _ = self.up(x)
        y, _ = self.down(F.gelu(y))
        return y


class FairscaleMLP(nn.Module):
    def __init__(self, up, down, rank, size):
        super().__init__()
        from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear

        h, f = up.in_features, up.out_features
        ident = lambda w: w  # noqa: E731
        self.up = ColumnParallelLinear(h, f, bias=True, gather_output=False, init_method=ident)
        self.down = RowParallelLinear(f, h, bias=True, input_is_parallel=True, init_method=ident)
        n = f // size
        cols = slice(rank * n, (rank + 1) * n)
        with torch.no_grad():
            self.up.weight.copy_(up.weight[cols])
            self.up.bias.copy_(up.bias[cols])
            self.down.weight.copy_(down.weight[:, cols])
            self.down.bias.copy_(down.bias)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


# ---- harness -------------------------------------------------------------------------------------


@dataclass
class Groups:
    rank: int
    size: int
    mesh: shardwise.Mesh  # shardwise's tp=2 mesh
    minimal: object  # process group of the minimal reference
    megatron: object | None
    self_group: object  # a 1-rank group: megatron's tp=1
    dt_mesh: object  # DTensor's 2-rank device mesh
    dt_self_mesh: object | None  # DTensor's 1-rank device mesh
    fairscale: bool


def setup(impls: list[str]) -> Groups:
    mesh = shardwise.init_mesh(2)  # joins the gloo process group
    rank, size = dist.get_rank(), dist.get_world_size()
    # new_group is collective: every rank creates every group in the same order.
    minimal = dist.new_group([0, 1])
    megatron = dist.new_group([0, 1])
    self_groups = [dist.new_group([r]) for r in range(size)]
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    dt_mesh = init_device_mesh("cpu", (size,))
    try:
        dt_self_mesh = DeviceMesh.from_group(self_groups[rank], "cpu")
    except Exception as e:  # noqa: BLE001
        print(f"[rank {rank}] DTensor 1-rank mesh unavailable: {e!r}", flush=True)
        dt_self_mesh = None
    fair = False
    if "fairscale" in impls:
        try:
            from fairscale.nn.model_parallel import initialize as fs_init

            fs_init.initialize_model_parallel(size)
            fair = True
        except Exception as e:  # noqa: BLE001
            print(f"[rank {rank}] fairscale unavailable: {e!r}", flush=True)
    return Groups(rank, size, mesh, minimal, megatron, self_groups[rank], dt_mesh, dt_self_mesh, fair)


@dataclass
class Impl:
    name: str
    model: nn.Module
    x: torch.Tensor  # leaf with requires_grad, this rank's input
    dy: torch.Tensor  # upstream grad, same shape as the output
    params: list


def build(name, up, down, g: Groups, mode: str):
    """The model of implementation `name` in `mode` (tp | sp | tp1), or None where it has no such mode."""
    sp, tp1 = mode == "sp", mode == "tp1"
    size = 1 if tp1 else g.size
    rank = 0 if tp1 else g.rank
    if name == "dense":
        return DenseMLP(up, down) if tp1 else None
    if name == "minimal":
        return MinimalMLP(up, down, rank, size, None if tp1 else g.minimal, sp)
    if name == "shardwise":
        return shardwise_mlp(up, down, shardwise.Mesh.single() if tp1 else g.mesh, sp)
    if name == "dtensor":
        dm = g.dt_self_mesh if tp1 else g.dt_mesh
        return None if dm is None else dtensor_mlp(up, down, dm, sp)
    if name == "megatron-core":
        return MegatronMLP(up, down, rank, size, g.self_group if tp1 else g.megatron, sp)
    if name == "fairscale":
        return FairscaleMLP(up, down, rank, size) if (g.fairscale and mode == "tp") else None
    raise ValueError(name)


def local_grad(name, p):
    grad = p.grad
    if grad is None:
        return None
    return grad.to_local() if hasattr(grad, "to_local") else grad


def expected_grads(name, model, dense_grads, rank, size, tp1):
    """(this impl's param grads, the dense grads of the same slices), in matching order."""
    up_w, up_b, down_w, down_b = dense_grads
    f = up_w.shape[0]
    n = f // (1 if tp1 else size)
    r = 0 if tp1 else rank
    cols = slice(r * n, (r + 1) * n)
    want = [up_w[cols], up_b[cols], down_w[:, cols], down_b]
    if name == "minimal":
        got = [model.w1, model.b1, model.w2, model.b2]
    else:
        got = [model.up.weight, model.up.bias, model.down.weight, model.down.bias]
    return [local_grad(name, p) for p in got], want


def check(name, model, mode, x_full, dy_full, dense, dense_grads, g: Groups):
    """Max abs error of y, dx and the parameter grads against the dense model."""
    sp, tp1 = mode == "sp", mode == "tp1"
    tokens = x_full.shape[0]
    rows = slice(g.rank * tokens // g.size, (g.rank + 1) * tokens // g.size) if sp else slice(None)
    x = x_full[rows].clone().requires_grad_(True)
    dy = dy_full[rows].clone()
    xin = x.unsqueeze(1) if name == "megatron-core" else x
    y = model(xin)
    y = y.squeeze(1) if name == "megatron-core" else y
    y.backward(dy)
    y_ref, dx_ref = dense
    err_y = (y.detach() - y_ref[rows]).abs().max().item()
    err_dx = (x.grad - dx_ref[rows]).abs().max().item()
    got, want = expected_grads(name, model, dense_grads, g.rank, g.size, tp1)
    errs = [float("inf") if a is None else (a - b).abs().max().item() for a, b in zip(got, want, strict=True)]
    for p in model.parameters():
        p.grad = None
    return err_y, err_dx, errs


def make_impl(name, model, mode, x_full, dy_full, g: Groups) -> Impl:
    tokens = x_full.shape[0]
    if mode == "sp":
        rows = slice(g.rank * tokens // g.size, (g.rank + 1) * tokens // g.size)
        x, dy = x_full[rows].clone(), dy_full[rows].clone()
    else:
        x, dy = x_full.clone(), dy_full.clone()
    if name == "megatron-core":  # its layers take [s, b, h]: give it a [s, 1, h] leaf, no per-step view
        x, dy = x.unsqueeze(1).contiguous(), dy.unsqueeze(1).contiguous()
    return Impl(name, model, x.requires_grad_(True), dy, list(model.parameters()))


def timed_rounds(impls: list[Impl], warmup: int, steps: int) -> dict[str, list[float]]:
    """Round-robin steps; per step and implementation the max over ranks of the step's wall time."""
    n = len(impls)
    times = {impl.name: [] for impl in impls}
    sink = 0.0
    gc.collect()
    gc.disable()  # the same for every implementation: no collector pause lands in one of them
    try:
        for r in range(warmup + steps):
            local = torch.zeros(n, dtype=torch.float64)
            for j in range(n):
                i = (j + r) % n
                impl = impls[i]
                impl.x.grad = None
                for p in impl.params:
                    p.grad = None
                dist.barrier()
                t0 = time.perf_counter()
                y = impl.model(impl.x)
                y.backward(impl.dy)
                sink += y.reshape(-1)[0].item() + impl.x.grad.reshape(-1)[0].item()
                local[i] = time.perf_counter() - t0
                del y
            dist.all_reduce(local, op=dist.ReduceOp.MAX)
            if r >= warmup:
                for i, impl in enumerate(impls):
                    times[impl.name].append(local[i].item() * 1e3)
            if r % 8 == 7:
                gc.collect()  # untimed
    finally:
        gc.enable()
    assert sink == sink  # the reads above are used
    return times


def p90(xs):
    return quantile(xs, 0.9)


def steps_for(h, tokens, base):
    """Cheap configs get more steps (the shared machine's noise weighs most there), the biggest 20."""
    work = h * h * tokens  # ~flops
    if work >= 2048 * 2048 * 512:
        return max(20, base // 2)
    if work <= 128 * 128 * 512:
        return base * 4
    if work <= 2048 * 2048 * 8:
        return base * 3 // 2
    return base


def paired_ratios(ts, ref):
    """Per round t_impl / t_minimal of the same round: drift of the machine cancels in the pair."""
    return [a / b for a, b in zip(ts, ref, strict=True)]


def quantile(xs, q):
    xs = sorted(xs)
    k = q * (len(xs) - 1)
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def source_state():
    """Which shardwise was measured: the commit, and a digest of src/shardwise as it was (others edit it)."""
    import hashlib
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = os.path.join(root, "src", "shardwise")
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(src)):
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as fh:
                    digest.update(name.encode() + fh.read())

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001
            return None

    return {
        "commit": git("rev-parse", "HEAD"),
        "src_dirty": bool(git("status", "--porcelain", "src")),
        "src_sha256": digest.hexdigest()[:16],
    }


def machine_info():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {"torch": torch.__version__, "python": platform.python_version(), "shardwise": shardwise.__version__}
    for mod in ("megatron.core", "fairscale"):
        try:
            m = __import__(mod, fromlist=["x"])
            versions[mod] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001
            versions[mod] = None
    return {
        "shardwise_source": source_state(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "versions": versions,
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "THP_MEM_ALLOC_ENABLE")},
        "torch_threads": torch.get_num_threads(),
        "backend": dist.get_backend(),
        "world_size": dist.get_world_size(),
    }


IMPLS = ["dense", "minimal", "shardwise", "dtensor", "megatron-core", "fairscale"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, nargs="+", default=[128, 1024, 2048])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8, 512])
    ap.add_argument("--modes", nargs="+", default=["tp", "sp", "tp1"], choices=["tp", "sp", "tp1"])
    ap.add_argument("--impls", nargs="+", default=IMPLS)
    ap.add_argument(
        "--steps",
        type=int,
        default=40,
        help="timed steps: x4 at h=128, x1.5 at 8 tokens,\n halved (>= 20) at h=2048 x 512 tokens",
    )
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument(
        "--tp1-max-work",
        type=float,
        default=2048 * 2048 * 8,
        help="skip tp1 configs with h*h*tokens above this (cost: it runs the whole model per rank)",
    )
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/mlp-<date>.json)")
    ap.add_argument("--tag", default="", help="suffix for the default JSON name")
    args = ap.parse_args()

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    started = time.time()
    g = setup(args.impls)
    rank = g.rank
    info = machine_info()
    available = []
    for name in args.impls:
        if name == "megatron-core":
            try:
                import megatron.core.tensor_parallel  # noqa: F401
            except Exception as e:  # noqa: BLE001
                if rank == 0:
                    print(f"megatron-core unavailable, skipped: {e!r}", flush=True)
                continue
        available.append(name)

    def log(*a):
        if rank == 0:
            print(*a, flush=True)

    log(json.dumps(info))
    rows, checks = [], []
    for mode in args.modes:
        for h in args.hidden:
            for tokens in args.tokens:
                if mode == "tp1" and h * h * tokens > args.tp1_max_work:
                    continue
                torch.manual_seed(0)  # same dense weights and data on every rank
                up, down = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)
                x_full = torch.randn(tokens, h)
                dy_full = torch.randn(tokens, h)
                dense = DenseMLP(up, down)
                xd = x_full.clone().requires_grad_(True)
                yd = dense(xd)
                yd.backward(dy_full)
                dense_out = (yd.detach(), xd.grad)
                dense_grads = [dense.up.weight.grad, dense.up.bias.grad, dense.down.weight.grad, dense.down.bias.grad]
                impls = []
                for name in available:
                    try:
                        model = build(name, up, down, g, mode)
                    except Exception as e:  # noqa: BLE001
                        log(f"  {name} {mode}: cannot build: {e!r}")
                        model = None
                    # every rank must agree on the set (the steps hold barriers)
                    ok = torch.tensor([0 if model is None else 1])
                    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
                    if not ok.item():
                        continue
                    err_y, err_dx, errs = check(name, model, mode, x_full, dy_full, dense_out, dense_grads, g)
                    e = torch.tensor([err_y, err_dx, *errs], dtype=torch.float64)
                    dist.all_reduce(e, op=dist.ReduceOp.MAX)
                    e = e.tolist()
                    checks.append(
                        {
                            "impl": name,
                            "h": h,
                            "tokens": tokens,
                            "mode": mode,
                            "err_y": e[0],
                            "err_dx": e[1],
                            "err_grads": dict(
                                zip(["up.weight", "up.bias", "down.weight", "down.bias"], e[2:], strict=True)
                            ),
                        }
                    )
                    log(
                        f"  check {name:13s} h={h:5d} tokens={tokens:4d} {mode:3s}: max|dy|err y={e[0]:.2e} "
                        f"dx={e[1]:.2e} grads={max(e[2:]):.2e}" + ("" if max(e[2:]) < 1e-3 else f" {e[2:]}")
                    )
                    impls.append(make_impl(name, model, mode, x_full, dy_full, g))
                steps = steps_for(h, tokens, args.steps)
                t0 = time.time()
                times = timed_rounds(impls, args.warmup, steps)
                ref_ts = times.get("minimal")
                ref = statistics.median(ref_ts) if ref_ts else None
                for impl in impls:
                    ts = times[impl.name]
                    med = statistics.median(ts)
                    pr = paired_ratios(ts, ref_ts) if ref_ts else None
                    row = {
                        "impl": impl.name,
                        "h": h,
                        "tokens": tokens,
                        "mode": mode,
                        "steps": len(ts),
                        "median_ms": med,
                        "p90_ms": p90(ts),
                        "min_ms": min(ts),
                        "ratio_to_minimal": med / ref if ref else None,
                        "paired_ratio_median": statistics.median(pr) if pr else None,
                        "paired_ratio_iqr": [quantile(pr, 0.25), quantile(pr, 0.75)] if pr else None,
                        "times_ms": ts,
                    }
                    rows.append(row)
                    log(
                        f"{mode:3s} h={h:5d} tokens={tokens:4d} {impl.name:13s} median {med:9.3f} ms  "
                        f"p90 {row['p90_ms']:9.3f}  x{row['ratio_to_minimal']:.3f}  "
                        f"paired x{row['paired_ratio_median']:.3f} "
                        f"[{row['paired_ratio_iqr'][0]:.2f}, {row['paired_ratio_iqr'][1]:.2f}]"
                    )
                log(f"   ({steps} steps + {args.warmup} warm-up, {time.time() - t0:.1f} s)")
                del impls, times
                gc.collect()
    info["loadavg_end"] = os.getloadavg()
    info["wall_s"] = time.time() - started
    info["command"] = " ".join(
        [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "THP_MEM_ALLOC_ENABLE") if k in os.environ]
        + ["torchrun --nproc_per_node 2", *sys.argv]
    )
    info["args"] = vars(args)
    if rank == 0:
        out = args.out or os.path.join(
            os.path.dirname(os.path.abspath(__file__)),
            "results",
            f"mlp-{datetime.date.today().isoformat()}{('-' + args.tag) if args.tag else ''}.json",
        )
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as fh:
            json.dump({"machine": info, "checks": checks, "rows": rows}, fh, indent=1)
        print(f"wrote {out} ({info['wall_s']:.0f} s)", flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()
