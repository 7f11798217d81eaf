"""`shardwise verify`: prove that the tp-sharded model computes what the dense one does, on your model.

Every rank builds the sharded model; rank 0 also builds the dense one. Both run the same batch;
rank 0 reports, per output, the max absolute and relative difference: logits, and with --backward
the loss and every parameter's gradient (gathered from the shards)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

import shardwise

from ..sharding import dense_layout, full_gradients
from .registry import ModelSpec, load_model_dense, load_model_sharded, logits_of


@dataclass(frozen=True)
class VerifyConfig:
    tp: int = 2
    batch: int = 2
    seq: int = 16
    backward: bool = False
    tolerance: float = 1e-4  # absolute
    rtol: float = 1e-4  # relative to the output's largest magnitude: a row passes if either holds
    seed: int = 0


def _diff(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max |got - want|, that over max |want|): fp32 reordering errors scale with the values."""
    got, want = got.detach().double(), want.detach().double()
    err = (got - want).abs().max().item()
    return err, err / max(want.abs().max().item(), 1e-30)


def within(row: dict, atol: float, rtol: float) -> bool:
    return row["max_abs"] <= atol or row["max_rel"] <= rtol


def _loss(outputs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy for language models; the mean square for encoders' hidden states."""
    if outputs.shape[-1] == ids.shape[-1] or outputs.dim() != 3:
        return outputs.float().square().mean()
    return torch.nn.functional.cross_entropy(outputs[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def verify_rank(spec: ModelSpec, cfg: VerifyConfig) -> list[dict] | None:
    mesh = shardwise.init_mesh(cfg.tp)
    lead = mesh.tp_rank == 0
    start = time.perf_counter()
    model, _ = load_model_sharded(spec, mesh)
    dense = load_model_dense(spec)[0] if lead else None
    load_s = time.perf_counter() - start
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    ids = torch.randint(0, vocab or 256, (cfg.batch, cfg.seq), generator=torch.Generator().manual_seed(cfg.seed))
    rows = []
    with torch.set_grad_enabled(cfg.backward):
        out = logits_of(model, ids)
        if lead:
            rows.append(("logits", *_diff(out, logits_of(dense, ids))))
        if cfg.backward:
            loss = _loss(out, ids)
            loss.backward()
            grads = full_gradients(model, mesh)
            if lead:
                dense_loss = _loss(logits_of(dense, ids), ids)
                dense_loss.backward()
                rows.append(("loss", *_diff(loss, dense_loss)))
                params = dict(model.named_parameters())
                for name, p in dense.named_parameters():
                    rows.append((f"grad {name}", *_diff(dense_layout(grads[name], params[name]), p.grad)))
    if not lead:
        return None
    return [{"output": name, "max_abs": a, "max_rel": r, "load_s": load_s} for name, a, r in rows]


def main(spec: ModelSpec, cfg: VerifyConfig, model_name: str) -> int:
    print(f"shardwise verify {model_name}: dense vs tp={cfg.tp} on {cfg.tp} local ranks, batch {cfg.batch}x{cfg.seq}"
          f"{', forward and backward' if cfg.backward else ', forward'}, tolerance {cfg.tolerance:g}")  # fmt: skip
    start = time.perf_counter()
    rows = shardwise.launch(verify_rank, cfg.tp, spec, cfg)[0]
    worst = max(rows, key=lambda r: r["max_abs"])
    shown = rows if len(rows) <= 12 else rows[:3] + sorted(rows[3:], key=lambda r: -r["max_abs"])[:9]
    print(f"{'output':<60} {'max |abs|':>11} {'max rel':>11}")
    for row in shown:
        flag = "" if within(row, cfg.tolerance, cfg.rtol) else "  <-- beyond tolerance"
        print(f"{row['output'][:60]:<60} {row['max_abs']:>11.3e} {row['max_rel']:>11.3e}{flag}")
    if len(shown) < len(rows):
        print(f"({len(rows) - len(shown)} more gradients within {worst['max_abs']:.3e})")
    ok = all(within(r, cfg.tolerance, cfg.rtol) for r in rows)
    worst_rel = max(rows, key=lambda r: r["max_rel"])
    print(f"{'PASS' if ok else 'FAIL'}: every output within |abs| <= {cfg.tolerance:g} or rel <= {cfg.rtol:g}; "
          f"largest: abs {worst['max_abs']:.3e} ({worst['output']}), rel {worst_rel['max_rel']:.3e} "
          f"({worst_rel['output']})   ({time.perf_counter() - start:.1f} s)")  # fmt: skip
    return 0 if ok else 1
