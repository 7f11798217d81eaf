"""`shardwise verify`: prove that the tp-sharded model computes what the dense one does, on your model.

Every rank builds the sharded model; rank 0 also builds the dense one. Both run the same batch;
rank 0 reports, per output (logits, and with --backward the loss and every parameter's gradient, gathered
from the shards), whether EVERY element meets torch.testing's criterion

    |sharded - dense| <= atol + rtol * |dense|

with the max absolute difference and the worst element's share of its allowance. No output passes on a
relative error measured against its largest value: a small element far off fails however large the rest."""

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
    tolerance: float = 1e-4  # atol
    rtol: float = 1e-4  # per element, relative to that element of the dense output
    seed: int = 0


def compare(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> dict:
    """Element by element, as torch.testing.assert_close: element i passes if |got_i - want_i| <= atol +
    rtol * |want_i|. Returns max_abs (max |got - want|), worst (the largest |got_i - want_i| / (atol + rtol *
    |want_i|): <= 1 is a pass), rel_at_worst (|got_i - want_i| / |want_i| there), beyond (elements failing)
    and numel."""
    got, want = got.detach().double(), want.detach().double()
    err = (got - want).abs()
    ratio = err / (atol + rtol * want.abs())
    i = int(ratio.argmax()) if ratio.numel() else 0
    flat_err, flat_want = err.flatten(), want.abs().flatten()
    return {
        "max_abs": err.max().item() if err.numel() else 0.0,
        "worst": ratio.max().item() if ratio.numel() else 0.0,
        "rel_at_worst": (flat_err[i] / flat_want[i]).item() if flat_want.numel() and flat_want[i] > 0 else float("inf"),
        "beyond": int((ratio > 1).sum()),
        "numel": err.numel(),
    }


def within(row: dict) -> bool:
    """Every element of the output met |a - b| <= atol + rtol * |b|."""
    return row["beyond"] == 0


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

    def diff(name, got, want):
        rows.append({"output": name} | compare(got, want, cfg.tolerance, cfg.rtol))

    with torch.set_grad_enabled(cfg.backward):
        out = logits_of(model, ids)
        if lead:
            diff("logits", out, logits_of(dense, ids))
        if cfg.backward:
            loss = _loss(out, ids)
            loss.backward()
            grads = full_gradients(model, mesh)
            if lead:
                dense_loss = _loss(logits_of(dense, ids), ids)
                dense_loss.backward()
                diff("loss", loss, dense_loss)
                params = dict(model.named_parameters())
                for name, p in dense.named_parameters():
                    diff(f"grad {name}", dense_layout(grads[name], params[name]), p.grad)
    if not lead:
        return None
    return [row | {"load_s": load_s} for row in rows]


def main(spec: ModelSpec, cfg: VerifyConfig, model_name: str) -> int:
    criterion = f"|tp - dense| <= atol + rtol * |dense| for every element, atol={cfg.tolerance:g} rtol={cfg.rtol:g}"
    print(f"shardwise verify {model_name}: dense vs tp={cfg.tp} on {cfg.tp} local ranks, batch {cfg.batch}x{cfg.seq}"
          f"{', forward and backward' if cfg.backward else ', forward'}; criterion: {criterion}")  # fmt: skip
    start = time.perf_counter()
    rows = shardwise.launch(verify_rank, cfg.tp, spec, cfg)[0]
    worst = max(rows, key=lambda r: r["worst"])
    shown = rows if len(rows) <= 12 else rows[:3] + sorted(rows[3:], key=lambda r: -r["worst"])[:9]
    print(f"{'output':<56} {'max |abs|':>10} {'worst/allowed':>13} {'rel there':>10} {'beyond':>8}")
    for row in shown:
        flag = "" if within(row) else "  <-- beyond tolerance"
        print(f"{row['output'][:56]:<56} {row['max_abs']:>10.3e} {row['worst']:>13.3f} {row['rel_at_worst']:>10.2e} "
              f"{row['beyond']:>8}{flag}")  # fmt: skip
    if len(shown) < len(rows):
        print(f"({len(rows) - len(shown)} more gradients, each at most {shown[-1]['worst']:.3f} of its allowance)")
    ok = all(within(r) for r in rows)
    print(f"{'PASS' if ok else 'FAIL'}: {criterion}; worst element at {worst['worst']:.3f} of its allowance "
          f"({worst['output']}: abs {worst['max_abs']:.3e}); elements beyond: {sum(r['beyond'] for r in rows)} "
          f"of {sum(r['numel'] for r in rows)}   ({time.perf_counter() - start:.1f} s)")  # fmt: skip
    return 0 if ok else 1
