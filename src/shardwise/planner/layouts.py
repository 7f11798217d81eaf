"""Rank layouts (tp, dp, sequence parallelism) for a model on some hardware and explain the choice in numbers."""

from __future__ import annotations

import json
from pathlib import Path

from .costmodel import (
    HARDWARE,
    PRESETS,
    ModelConfig,
    Prediction,
    best_chunks,
    from_calibration,
    heads_feasible,
    ring_steps,
)


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


def load_hardware(name: str | None, calibration: str | None):
    if calibration:
        return from_calibration(calibration)
    if name not in HARDWARE:
        raise ValueError(f"unknown hardware {name!r}: use one of {', '.join(HARDWARE)} or --calibration FILE")
    return HARDWARE[name]


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def report(cfg: ModelConfig, hw, devices: int, options: list[Prediction]) -> str:
    lines = [
        f"model: {cfg.params / 1e9:.2f} B params, h={cfg.hidden}, ffn={cfg.ffn}, heads={cfg.heads}/{cfg.kv_heads} kv, "
        f"{cfg.layers} layers, seq={cfg.seq}, micro-batch={cfg.micro_batch}, {8 * cfg.dtype_bytes}-bit",
        f"hardware: {hw.name} ({hw.note}); {devices} devices, {hw.devices_per_node} per node, "
        f"{hw.flops / 1e12:.1f} TFLOP/s achievable, {hw.memory / 2**30:.0f} GiB each",
        "",
        f"{'tp':>3} {'dp':>3} {'SP':>3} {'comp ms':>8} {'comm ms':>8} {'R(m)':>6} {'mem GiB':>8} "
        f"{'(par/grad/opt/act)':>20} {'fits':>4} {'step s':>8} {'tokens/s':>10}  note",
    ]  # fmt: skip
    for p in options:
        m = p.memory
        parts = "/".join(_gib(m[k]) for k in ("params", "grads", "optimizer", "activations"))
        notes = []
        if p.tp_spans_nodes:
            notes.append("tp spans nodes")
        kind = heads_feasible(cfg, p.tp)[1]
        if kind != "even":
            notes.append(kind)
        if not p.fits:
            notes.append("does not fit")
        lines.append(
            f"{p.tp:>3} {p.dp:>3} {'on' if p.sequence_parallel else 'off':>3} {p.compute_s * 1e3:>8.2f} "
            f"{p.comm_s * 1e3:>8.2f} {p.R:>6.2f} {_gib(m['total']):>8} {parts:>20} {'yes' if p.fits else 'no':>4} "
            f"{p.step_s:>8.3f} {p.tokens_per_s:>10.0f}  {', '.join(notes)}"
        )  # fmt: skip
    return "\n".join(lines)


def recommend(options: list[Prediction]) -> tuple[Prediction | None, str]:
    fitting = [p for p in options if p.fits]
    if not fitting:
        return None, "no TP degree fits in memory: use more devices, a smaller micro-batch, or recomputation"
    best = fitting[0]
    why = [f"shortest predicted step ({best.step_s:.3f} s, {best.tokens_per_s:.0f} tokens/s) of the degrees that fit"]
    smaller = [p for p in options if p.tp < best.tp]
    if smaller and all(not p.fits for p in smaller):
        why.append(f"tp<{best.tp} does not fit in memory")
    larger = [p for p in fitting if p.tp > best.tp]
    if larger:
        nxt = min(larger, key=lambda p: p.tp)
        reason = "crosses nodes" if nxt.tp_spans_nodes and not best.tp_spans_nodes else f"R rises to {nxt.R:.2f}"
        why.append(f"tp={nxt.tp} is slower: {reason}, step {nxt.step_s:.3f} s")
    sp = "with" if best.sequence_parallel else "without"
    return best, f"recommend tp={best.tp}, dp={best.dp}, {sp} sequence parallelism: " + "; ".join(why)


def overlap_chunks(cfg: ModelConfig, hw, best: Prediction) -> int:
    """Predicted best chunk count for one sequence-parallel collective and the GEMM beside it."""
    act = cfg.micro_batch * cfg.seq * cfg.hidden * cfg.dtype_bytes
    link = hw.link("all_gather", best.tp_spans_nodes)
    steps, fraction = ring_steps("all_gather", best.tp)
    # 8 collectives per layer and step under SP, each beside about an eighth of the layer's GEMMs
    # 20 us per extra chunk: a kernel launch and a less efficient, smaller GEMM
    return best_chunks(steps * link.latency_s, fraction / link.bandwidth, act, best.compute_s / 8,
                       chunk_overhead_s=20e-6)  # fmt: skip
