"""Rank layouts (tp, dp, placement, sequence parallelism, recomputation, overlap, ZeRO) for a model on some
hardware and explain the choice in numbers."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from .costmodel import HARDWARE, PRESETS, ModelConfig, Prediction, best_chunks, from_calibration, heads_feasible
from .hardware import Hardware, ring_steps


def load_config(spec: str, seq: int | None, micro_batch: int | None, dtype_bytes: int | None) -> ModelConfig:
    """A preset name, a JSON file of ModelConfig fields, or a Hugging Face config.json / model folder."""
    if spec in PRESETS:
        cfg = PRESETS[spec]
    else:
        path = Path(spec)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"unknown model config {spec!r}: use a preset ({', '.join(PRESETS)}), a JSON file or "
                             "a Hugging Face model folder")  # fmt: skip
        data = json.loads(path.read_text())
        if "hidden_size" in data:  # Hugging Face naming
            heads = data["num_attention_heads"]
            data = {"hidden": data["hidden_size"], "ffn": data.get("intermediate_size", 4 * data["hidden_size"]),
                    "heads": heads, "kv_heads": data.get("num_key_value_heads") or heads,
                    "layers": data["num_hidden_layers"], "vocab": data["vocab_size"],
                    "seq": data.get("max_position_embeddings", 2048),
                    "swiglu": data.get("hidden_act", "silu") == "silu"}  # fmt: skip
        cfg = ModelConfig.from_dict(data)
    changes = {k: v for k, v in (("seq", seq), ("micro_batch", micro_batch), ("dtype_bytes", dtype_bytes)) if v}
    return ModelConfig(**{**cfg.__dict__, **changes})


def load_hardware(name: str | None, calibration: str | None, devices_per_node: int | None = None) -> Hardware:
    """A named profile or a calibration; devices_per_node overrides where nodes begin."""
    hw = from_calibration(calibration) if calibration else None
    if hw is None and name not in HARDWARE:
        raise ValueError(f"unknown hardware {name!r}: use one of {', '.join(HARDWARE)} or --calibration FILE")
    hw = hw or HARDWARE[name]
    if devices_per_node:
        hw = replace(hw, devices_per_node=devices_per_node)
    return hw


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms"


def link_name(hw: Hardware, klass: str) -> str:
    return {"intra": hw.intra_name, "inter": hw.inter_name, "mixed": f"{hw.inter_name} (ring mixing both links)",
            "none": "no link"}[klass]  # fmt: skip


def _flags(p: Prediction) -> str:
    parts = [p.placement if p.tp > 1 and p.dp > 1 else "", "SP" if p.sequence_parallel else "",
             f"rc={p.recompute}" if p.recompute != "none" else "", "overlap" if p.overlap else "",
             "zero" if p.zero else ""]  # fmt: skip
    return " ".join(x for x in parts if x) or "-"


def best_per_tp(options: list[Prediction]) -> list[Prediction]:
    """The first (best) layout of each tp degree, in ranking order."""
    seen, out = set(), []
    for p in options:
        if p.tp not in seen:
            seen.add(p.tp)
            out.append(p)
    return out


def report(cfg: ModelConfig, hw, devices: int, options: list[Prediction], rows: int = 12) -> str:
    """The ranking as a table: the best `rows` layouts, plus the best of every tp degree not among them."""
    lines = [
        f"model: {cfg.params / 1e9:.2f} B params, h={cfg.hidden}, ffn={cfg.ffn}, heads={cfg.heads}/{cfg.kv_heads} kv, "
        f"{cfg.layers} layers, seq={cfg.seq}, micro-batch={cfg.micro_batch}, {8 * cfg.dtype_bytes}-bit",
        f"hardware: {hw.name} ({hw.note}); {devices} devices, {hw.devices_per_node} per node, "
        f"{hw.flops / 1e12:.1f} TFLOP/s peak matmul, {hw.memory / 2**30:.0f} GiB each",
        "",
        f"{'tp':>3} {'dp':>3} {'layout':<30} {'comp ms':>8} {'comm ms':>8} {'expo ms':>8} {'R(m)':>6} {'tp link':>7} "
        f"{'dp ms':>7} {'mem GiB':>8} {'fits':>4} {'step s':>8} {'tokens/s':>10}  note",
    ]  # fmt: skip
    shown = options[:rows] + [p for p in best_per_tp(options) if p not in options[:rows]]
    for p in shown:
        notes = []
        if p.tp_spans_nodes:
            notes.append("tp spans nodes")
        kind = heads_feasible(cfg, p.tp)[1]
        if kind != "even":
            notes.append(kind)
        if not p.fits:
            notes.append("does not fit")
        lines.append(
            f"{p.tp:>3} {p.dp:>3} {_flags(p):<30} {p.compute_s * 1e3:>8.2f} {p.comm_s * 1e3:>8.2f} "
            f"{p.exposed_comm_s * 1e3:>8.2f} {p.R:>6.2f} {p.tp_link:>7} {p.dp_exposed_s * 1e3:>7.1f} "
            f"{_gib(p.memory['total']):>8} {'yes' if p.fits else 'no':>4} {p.step_s:>8.3f} {p.tokens_per_s:>10.0f}"
            f"  {', '.join(notes)}"
        )  # fmt: skip
    lines.append(f"({len(options)} layouts ranked; comp/comm/expo: one layer, one micro-batch, fwd+bwd; expo = comm "
                 "overlap cannot hide; dp ms: what the dp all-reduce adds to the step)")  # fmt: skip
    return "\n".join(lines)


def _vs(p: Prediction, best: Prediction) -> str:
    return f"step {p.step_s:.3f} s vs {best.step_s:.3f} s ({p.step_s / best.step_s - 1:+.0%})"


def _why_not(p: Prediction, best: Prediction, hw, limit: float) -> str:
    """Why layout p (another tp) loses to best, in the numbers that differ most."""
    if not p.fits:
        return f"tp={p.tp} does not fit: {_gib(p.memory['total'])} GiB > {_gib(limit)} GiB usable"
    reasons = []
    if p.tp > best.tp:
        reasons.append(f"R rises to {p.R:.2f} (comm {_ms(p.comm_s)} per layer, {_ms(p.exposed_comm_s)} exposed, "
                       f"on {link_name(hw, p.tp_link)})")  # fmt: skip
    else:
        reasons.append(f"compute {_ms(p.compute_s)} per layer instead of {_ms(best.compute_s)}")
        if p.dp_exposed_s > best.dp_exposed_s:
            reasons.append(f"dp all-reduce adds {_ms(p.dp_exposed_s)} (vs {_ms(best.dp_exposed_s)})")
    return f"tp={p.tp} is slower: " + ", ".join(reasons) + f"; {_vs(p, best)}"


def recommend(options: list[Prediction], hw=None, cfg: ModelConfig | None = None) -> tuple[Prediction | None, str]:
    """The first fitting layout and why, in numbers: this tp (R, exposed comm, the link crossed), the next smaller
    and larger tp, "no TP" when one device holds the model, the placement and dp overlap, memory."""
    fitting = [p for p in options if p.fits]
    if not fitting:
        return None, "no layout fits in memory: use more devices, a smaller micro-batch, recompute=full or ZeRO"
    best = fitting[0]
    limit = 0.9 * hw.memory if hw is not None else math.inf
    head = (f"recommend tp={best.tp}, dp={best.dp}, {'with' if best.sequence_parallel else 'without'} sequence "
            f"parallelism, placement {best.placement}, recompute {best.recompute}, overlap "
            f"{'on' if best.overlap else 'off'}, ZeRO {'on' if best.zero else 'off'}: step {best.step_s:.3f} s "
            f"({best.tokens_per_s:.0f} tokens/s), the shortest of {len(fitting)} fitting layouts")  # fmt: skip
    why = []
    per_tp = {p.tp: p for p in best_per_tp(options)}
    if best.tp == 1:
        two = per_tp.get(min((t for t in per_tp if t > 1), default=0))
        tail = ""
        if two:
            tail = (f": R={two.R:.2f} at tp={two.tp} (comm {_ms(two.comm_s)} vs compute {_ms(two.compute_s)} per "
                    f"layer, on {link_name(hw, two.tp_link) if hw else two.tp_link}), {_vs(two, best)}")  # fmt: skip
        why.append(f"no TP (tp=1, dp={best.dp}): one device holds the model ({_gib(best.memory['total'])} GiB"
                   + (f" of {_gib(limit)}" if hw else "") + ") and TP would not pay" + tail)  # fmt: skip
    else:
        link = link_name(hw, best.tp_link) if hw else best.tp_link
        why.append(f"tp={best.tp}: R={best.R:.2f} (comm {_ms(best.comm_s)} per layer, {_ms(best.exposed_comm_s)} "
                   f"exposed, compute {_ms(best.compute_s)}), tp collectives on {link}")  # fmt: skip
    smaller = [t for t in per_tp if t < best.tp]
    larger = [t for t in per_tp if t > best.tp]
    if smaller:
        why.append(_why_not(per_tp[max(smaller)], best, hw, limit))
    if larger and best.tp > 1 or larger and not why[0].startswith("no TP"):
        why.append(_why_not(per_tp[min(larger)], best, hw, limit))
    if best.dp > 1:
        where = "tp inside a node" if best.tp_link in ("intra", "none") else f"tp across nodes ({best.tp_link})"
        tp_where = f"tp collectives on {link_name(hw, best.tp_link)}" if hw and best.tp > 1 else ""
        why.append(f"placement {best.placement}: {where}" + (f": {tp_where}" if tp_where else "")
                   + f"; dp over {link_name(hw, best.dp_link) if hw else best.dp_link}: one bucketed all-reduce per "
                   f"step ({_ms(best.dp_comm_s)}), {best.dp_hidden_fraction:.0%} hidden behind backward, "
                   f"{_ms(best.dp_exposed_s)} added")  # fmt: skip
    m = best.memory
    why.append(f"memory {_gib(m['total'])} GiB per device (params {_gib(m['params'])}, grads {_gib(m['grads'])}, "
               f"optimizer {_gib(m['optimizer'])}, activations {_gib(m['activations'])})")  # fmt: skip
    return best, head + "\n  - " + "\n  - ".join(why)


def overlap_chunks(cfg: ModelConfig, hw, best: Prediction) -> int:
    """Predicted best chunk count for one sequence-parallel collective and the GEMM beside it."""
    act = cfg.micro_batch * cfg.seq * cfg.hidden * cfg.dtype_bytes
    link = hw.link("all_gather", best.tp_spans_nodes)
    steps, fraction = ring_steps("all_gather", best.tp)
    # 8 collectives per layer and step under SP, each beside about an eighth of the layer's GEMMs
    # 20 us per extra chunk: a kernel launch and a less efficient, smaller GEMM
    return best_chunks(steps * link.latency_s, fraction / link.bandwidth, act, best.compute_s / 8,
                       chunk_overhead_s=20e-6)  # fmt: skip
