"""What one training step does, as shardwise's own GPT runs it: the model config, and the op list of one
transformer layer and of the once-per-micro-batch edges (embedding, final norm, LM head, cross-entropy), per
rank, with the shapes each rank really works on (the rank with the most heads under an uneven split).

Element-wise work is counted in "units" of one tensor's bytes read or written (an add of two tensors into a
third: 3 units), from the torch ops nn/ and layers/ issue (see each op's comment). Collectives carry the FULL
tensor's bytes (as calibrations and the ring formulas use) and the phase they run in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..comm.checks import SHAPE_ROW_NUMEL, shape_checks_on
from ..heads import head_layout


@dataclass(frozen=True)
class ModelConfig:
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    seq: int
    micro_batch: int = 1
    dtype_bytes: int = 2  # bf16 activations and weights
    swiglu: bool = True
    flash_attention: bool = True  # attention scores not kept for backward (fused SDPA / flash)
    bias: bool = False  # linear biases (shardwise GPT, GPT-2: yes; LLaMA: no)
    rope: bool = True  # rotary positions on q and k
    rmsnorm: bool = True  # RMSNorm (weight only) instead of LayerNorm (weight, bias)
    dropout: float = 0.0  # residual dropout

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def params_per_layer(self) -> int:
        h, d = self.hidden, self.head_dim
        attn = h * (self.heads * d) * 2 + h * (self.kv_heads * d) * 2
        mlp = h * self.ffn * (3 if self.swiglu else 2)
        biases = (self.heads + 2 * self.kv_heads) * d + h + self.ffn * (2 if self.swiglu else 1) + h
        return attn + mlp + (1 if self.rmsnorm else 2) * 2 * h + (biases if self.bias else 0)

    @property
    def params(self) -> int:
        return self.layers * self.params_per_layer + self.vocab * self.hidden * 2 + self.hidden

    @staticmethod
    def from_dict(d: dict) -> ModelConfig:
        known = {f.name for f in fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in d.items() if k in known})


PRESETS = {
    "llama-7b": ModelConfig(hidden=4096, ffn=11008, heads=32, kv_heads=32, layers=32, vocab=32000, seq=4096),
    "llama3-8b": ModelConfig(hidden=4096, ffn=14336, heads=32, kv_heads=8, layers=32, vocab=128256, seq=8192),
    "llama-13b": ModelConfig(hidden=5120, ffn=13824, heads=40, kv_heads=40, layers=40, vocab=32000, seq=4096),
    "llama-70b": ModelConfig(hidden=8192, ffn=28672, heads=64, kv_heads=8, layers=80, vocab=32000, seq=4096),
    "smollm2-135m": ModelConfig(hidden=576, ffn=1536, heads=9, kv_heads=3, layers=30, vocab=49152, seq=2048),
}


def block_config(hidden: int, heads: int, seq: int, batch: int) -> ModelConfig:
    """The GPT block of the scaling benchmark: GELU MLP of 4h, MHA, LayerNorm, biases, no rotary, fp32, causal
    SDPA (fused: scores not kept)."""
    return ModelConfig(hidden=hidden, ffn=4 * hidden, heads=heads, kv_heads=heads, layers=1, vocab=1, seq=seq,
                       micro_batch=batch, dtype_bytes=4, swiglu=False, flash_attention=True, bias=True, rope=False,
                       rmsnorm=False)  # fmt: skip


def gpt_config(gpt, seq: int, micro_batch: int, dtype_bytes: int = 4) -> ModelConfig:
    """The ModelConfig of a shardwise GPTConfig (or its dict): rotary, causal SDPA, tied embedding."""
    g = gpt if isinstance(gpt, dict) else gpt.to_dict()
    h, heads = g["hidden"], g["num_heads"]
    return ModelConfig(hidden=h, ffn=g.get("ffn_hidden") or 4 * h, heads=heads, kv_heads=g.get("num_kv_heads") or heads,
                       layers=g["num_layers"], vocab=g["vocab_size"], seq=seq, micro_batch=micro_batch,
                       dtype_bytes=dtype_bytes, swiglu=g.get("activation", "gelu") == "swiglu", flash_attention=True,
                       bias=g.get("bias", True), rope=True, rmsnorm=g.get("norm", "layernorm") == "rmsnorm",
                       dropout=g.get("dropout", 0.0))  # fmt: skip


def layer_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs of one transformer layer for one micro-batch (2 per multiply-add; full s x s scores)."""
    tokens, h, d = cfg.micro_batch * cfg.seq, cfg.hidden, cfg.head_dim
    projections = 2 * tokens * h * (2 * cfg.heads * d + 2 * cfg.kv_heads * d)
    attention = 2 * 2 * tokens * cfg.seq * cfg.heads * d  # QK^T and AV over the full sequence
    mlp = 2 * tokens * h * cfg.ffn * (3 if cfg.swiglu else 2)
    return projections + attention + mlp


def heads_feasible(cfg: ModelConfig, tp: int) -> tuple[bool, str]:
    if tp > cfg.heads:
        return False, f"tp={tp} > {cfg.heads} heads"
    if cfg.heads % tp or cfg.kv_heads % tp and tp % cfg.kv_heads:
        return True, "uneven heads (whole heads per rank; kv heads shared)"
    return True, "even"


def activation_bytes_per_layer(cfg: ModelConfig, tp: int, sequence_parallel: bool, recompute: str = "none") -> float:
    """Bytes kept for backward by one layer (Korthikanti et al. 2022, 16-bit activations, scaled by dtype):
    none: s*b*h*(10 + 24/t) without sequence parallelism, s*b*h*34/t with it, plus 5*a*s^2*b/t for the
    attention scores unless flash attention recomputes them; selective: without the scores term; full: only
    the layer's input, 2*s*b*h (2*s*b*h/t with sequence parallelism)."""
    sbh = cfg.seq * cfg.micro_batch * cfg.hidden * cfg.dtype_bytes / 2
    if recompute == "full":
        return 2 * sbh / (tp if sequence_parallel else 1)
    base = sbh * (34 / tp if sequence_parallel else 10 + 24 / tp)
    keep_scores = not cfg.flash_attention and recompute == "none"
    scores = 5 * cfg.heads * cfg.seq**2 * cfg.micro_batch / tp * cfg.dtype_bytes / 2 if keep_scores else 0
    return base + scores


@dataclass(frozen=True)
class Op:
    """One piece of work. kind 'gemm': [m, k] x [k, n] (batch of them), `hides` = its backward dW is what an
    overlapped column layer hides its input-grad collective behind; 'attn': causal attention core over `batch`
    (batch x local heads) sequences of s x d; 'ew': element-wise, fwd/bwd bytes and op counts; 'coll': a
    collective `op` of `nbytes` (full tensor) on group 'tp' in `phase`, `hideable` by the layer's dW."""

    part: str
    kind: str
    m: int = 0
    k: int = 0
    n: int = 0
    batch: int = 1
    fwd_bytes: float = 0.0
    bwd_bytes: float = 0.0
    fwd_ops: int = 0
    bwd_ops: int = 0
    op: str = ""
    nbytes: float = 0.0
    phase: str = "fwd"
    hideable: bool = False
    hides: bool = False
    ew_kind: str = ""  # a measured element-wise kind (calibration_kernels.KINDS) timing this op, per element
    elems: float = 0.0  # elements one call of that kind works on
    bwd_kind: str = ""  # "kind:phase" timing the backward instead of ew_kind's own ("-": by bytes)
    nodes: int = 0  # 'glue': autograd nodes no measured kernel covers
    tensors: int = 0  # 'glue': parameter tensors (one AccumulateGrad each in backward)


# Dispatch the measured kernels do not cover, per rank and micro-batch, counted once with torch.profiler
# (torch 2.13, CPU, shardwise GPT h=256, 8 heads, s=64, b=1, GELU, LayerNorm, biases, rotary) at tp=1 and tp=2:
# every aten:: event (nested ones included, as calibration_kernels.overheads counts them) that does not descend
# from a measured root (aten::linear / matmul: the GEMM grid; scaled_dot_product_attention; layer_norm,
# rms_norm, gelu, silu, mul; in backward the nodes AddmmBackward0, MmBackward0, the SDPA, GELU, SiLU, Mul and
# LayerNorm backwards), and every autograd node outside them (AccumulateGrad apart). Per block: GPT with 2
# layers minus GPT with 1, less rotary's own ops (the "rotary" kernel times the whole function); edges
# (embedding, final norm, head, vocab-parallel cross-entropy): 2 x GPT(1 layer) - GPT(2 layers). SwiGLU and
# RMSNorm add only ops their kernels cover. tp > 2: the tp=2 counts (the same wrappers). (fwd ops, bwd ops, nodes)
SHAPE_ROW_BYTES = SHAPE_ROW_NUMEL * 8  # comm.checks' int64 row, per rank
BLOCK_GLUE = {1: (15, 76, 28), 2: (21, 88, 34)}
EDGE_GLUE = {1: (212, 48, 7), 2: (269, 74, 13)}


@dataclass(frozen=True)
class Local:
    """Per-rank sizes (the rank with the most q heads: it sets the pace)."""

    tokens: int
    sp_tokens: int
    q: int  # local q heads
    kv: int  # local kv heads
    kv_repeat: bool  # kv heads repeated / indexed to the q heads
    kv_replicated: bool  # some kv head held by several ranks: its grads all-reduced
    ffn: int
    vocab: int


def local_sizes(cfg: ModelConfig, tp: int, sequence_parallel: bool) -> Local:
    lays = [head_layout(cfg.heads, cfg.kv_heads, tp, r) for r in range(tp)]
    big = max(lays, key=lambda lay: lay.q_stop - lay.q_start)
    q, kv = big.q_stop - big.q_start, big.kv_stop - big.kv_start
    tokens = cfg.micro_batch * cfg.seq
    return Local(tokens, tokens // tp if sequence_parallel else tokens, q, kv, q != kv,
                 any(lay.kv_shared for lay in lays), math.ceil(cfg.ffn / tp), math.ceil(cfg.vocab / tp))  # fmt: skip


def _norm(cfg: ModelConfig, part: str, t: int) -> list[Op]:
    e, h = cfg.dtype_bytes, cfg.hidden
    # fwd: read x, write y (stats are [t]); bwd: read dy and x, write dx, reduce dy * xhat into dw (and db)
    # under SP the replicated weight (+ bias) grads are summed by the coalesced sp_grad_sync (edge_ops)
    return [Op(part, "ew", fwd_bytes=2 * t * h * e, bwd_bytes=4 * t * h * e, fwd_ops=1, bwd_ops=3,
               ew_kind="rms_norm" if cfg.rmsnorm else "layer_norm", elems=t * h)]  # fmt: skip


def _shape_check(part: str, tp: int) -> list[Op]:
    """checks.check_same_shape, as GPT runs it under SP: once per forward, on the ids, booked to the embedding
    (every collective after it runs in comm.checks.shapes_agreed): an all-gather of one int64 row per rank (none
    with SHARDWISE_CHECK_SHAPES=0)."""
    return [Op(part, "coll", op="all_gather", nbytes=SHAPE_ROW_BYTES * tp, phase="fwd")] if shape_checks_on() else []


def replicated_grad_bytes(cfg: ModelConfig) -> float:
    """Bytes of the parameters whole on every tp rank whose grads SP sums over tp (comm/grad_sync.py): each
    layer's two norms and two row-layer biases, the final norm."""
    norm = (1 if cfg.rmsnorm else 2) * cfg.hidden
    return (cfg.layers * (2 * norm + (2 * cfg.hidden if cfg.bias else 0)) + norm) * cfg.dtype_bytes


def _entry(part: str, nbytes: float, sp: bool, tp: int) -> list[Op]:
    """A column layer's input collective: copy_to_tp (bwd all-reduce of dx) or SP's gather_from_sp."""
    if tp == 1:
        return []
    if sp:
        return [Op(part, "coll", op="all_gather", nbytes=nbytes, phase="fwd"),
                Op(part, "coll", op="reduce_scatter", nbytes=nbytes, phase="bwd", hideable=True)]
    return [Op(part, "coll", op="all_reduce", nbytes=nbytes, phase="bwd", hideable=True)]


def _exit(cfg: ModelConfig, part: str, L: Local, sp: bool, tp: int) -> list[Op]:
    """A row layer's output: reduce_from_tp (fwd all-reduce) or SP's reduce-scatter (bwd all-gather), then the
    bias added once after the reduction (under SP its grad is summed over tp)."""
    e, h, t = cfg.dtype_bytes, cfg.hidden, L.sp_tokens
    nbytes = L.tokens * h * e
    if tp == 1:
        return []
    ops = [Op(part, "coll", op="reduce_scatter" if sp else "all_reduce", nbytes=nbytes, phase="fwd")]
    if sp:
        ops.append(Op(part, "coll", op="all_gather", nbytes=nbytes, phase="bwd"))
    if cfg.bias:  # y + bias: read 2 write 1; bwd: bias grad = sum of dy over tokens (under SP: sp_grad_sync)
        ops.append(Op(part, "ew", fwd_bytes=3 * t * h * e, bwd_bytes=t * h * e, fwd_ops=1, bwd_ops=1, ew_kind="add",
                      elems=t * h, bwd_kind="-"))  # fmt: skip
    return ops


def _residual(cfg: ModelConfig, part: str, t: int) -> list[Op]:
    e, h = cfg.dtype_bytes, cfg.hidden
    ops = []
    if cfg.dropout > 0:  # mask drawn and applied: x * keep / (1 - p); bwd: dy * keep / (1 - p)
        ops.append(Op(part, "ew", fwd_bytes=4 * t * h * e, bwd_bytes=3 * t * h * e, fwd_ops=3, bwd_ops=2,
                      ew_kind="dropout", elems=t * h))  # fmt: skip
    # x + f(x): read 2 write 1; bwd: autograd adds the residual grad to the branch's grad (read 2 write 1)
    ops.append(Op(part, "ew", fwd_bytes=3 * t * h * e, bwd_bytes=3 * t * h * e, fwd_ops=1, bwd_ops=1, ew_kind="add",
                  elems=t * h, bwd_kind="add:fwd"))  # fmt: skip
    return ops


def layer_ops(cfg: ModelConfig, tp: int, sequence_parallel: bool = False) -> list[Op]:
    """The ops of one transformer layer (nn/block.py: x + attn(norm1(x)), then + mlp(norm2(.))) on one rank."""
    sp = sequence_parallel and tp > 1
    L = local_sizes(cfg, tp, sp)
    e, h, d, T, t = cfg.dtype_bytes, cfg.hidden, cfg.head_dim, L.tokens, L.sp_tokens
    qd, kvd = L.q * d, L.kv * d
    bias_grad = lambda out: T * out * e if cfg.bias else 0  # noqa: E731  (F.linear's db: sum of dy over tokens)
    ops = _norm(cfg, "attn", t) + _entry("attn", T * h * e, sp, tp)
    for out in (qd, kvd, kvd):
        ops.append(Op("attn", "gemm", m=T, k=h, n=out, hides=True))
        ops.append(Op("attn", "ew", bwd_bytes=bias_grad(out), bwd_ops=1 if cfg.bias else 0))
    # the three projections' input grads summed into one dx by autograd: two adds
    ops.append(Op("attn", "ew", bwd_bytes=2 * 3 * T * h * e, bwd_ops=2))
    if L.kv_replicated and tp > 1:  # sum_grad_over_replicas: full k and v weight (and bias) grads
        full = cfg.kv_heads * d * (h + (1 if cfg.bias else 0)) * e
        ops += [Op("attn", "coll", op="all_reduce", nbytes=full / 2, phase="bwd") for _ in range(2 * (1 + cfg.bias))]
    if cfg.rope:  # x*cos + cat(-x2, x1)*sin: mul 2, neg 1, cat 2, mul 2, add 3 units; cos/sin tables ~10 small ops
        for width in (qd, kvd):
            ops.append(Op("attn", "ew", fwd_bytes=10 * T * width * e, bwd_bytes=8 * T * width * e, fwd_ops=5,
                          bwd_ops=5, ew_kind="rotary", elems=T * width))  # fmt: skip
        ops.append(Op("attn", "ew", fwd_ops=10))
    if L.kv_repeat:  # repeat_interleave / index_select of k and v to the q heads; bwd sums them back
        ops.append(Op("attn", "ew", fwd_bytes=2 * T * (kvd + qd) * e, bwd_bytes=2 * T * (kvd + qd) * e, fwd_ops=2,
                      bwd_ops=2))  # fmt: skip
    ops.append(Op("attn", "attn", batch=cfg.micro_batch * L.q, m=cfg.seq, k=d))
    ops.append(Op("attn", "ew", fwd_bytes=2 * T * qd * e, bwd_bytes=2 * T * qd * e, fwd_ops=1, bwd_ops=1))  # permute
    ops.append(Op("attn", "gemm", m=T, k=qd, n=h))
    if cfg.bias and tp == 1:
        ops.append(Op("attn", "ew", bwd_bytes=bias_grad(h), bwd_ops=1))
    ops += _exit(cfg, "attn", L, sp, tp) + _residual(cfg, "attn", t)
    ops += _norm(cfg, "mlp", t) + _entry("mlp", T * h * e, sp, tp)
    f = L.ffn
    for _ in range(2 if cfg.swiglu else 1):
        ops.append(Op("mlp", "gemm", m=T, k=h, n=f, hides=True))
        ops.append(Op("mlp", "ew", bwd_bytes=bias_grad(f), bwd_ops=1 if cfg.bias else 0))
    if cfg.swiglu:  # silu(gate) * up: 2 + 3 units; bwd: mul's two grads 5, silu's 3; gate/up dx summed: 3
        ops.append(Op("mlp", "ew", fwd_bytes=5 * T * f * e, bwd_bytes=8 * T * f * e + 3 * T * h * e, fwd_ops=2,
                      bwd_ops=3, ew_kind="silu_mul", elems=T * f))  # fmt: skip
    else:  # gelu: read x write y; bwd: read dy, x, write dx
        ops.append(Op("mlp", "ew", fwd_bytes=2 * T * f * e, bwd_bytes=3 * T * f * e, fwd_ops=1, bwd_ops=1,
                      ew_kind="gelu", elems=T * f))  # fmt: skip
    ops.append(Op("mlp", "gemm", m=T, k=f, n=h))
    if cfg.bias and tp == 1:
        ops.append(Op("mlp", "ew", bwd_bytes=bias_grad(h), bwd_ops=1))
    glue = BLOCK_GLUE[min(tp, 2)]
    ops.append(Op("mlp", "glue", fwd_ops=glue[0], bwd_ops=glue[1], nodes=glue[2], tensors=tensors_per_layer(cfg)))
    return ops + _exit(cfg, "mlp", L, sp, tp) + _residual(cfg, "mlp", t)


def edge_ops(cfg: ModelConfig, tp: int, sequence_parallel: bool = False) -> list[Op]:
    """Once per micro-batch (nn/gpt.py): vocab-parallel embedding, final norm, tied LM head, vocab-parallel
    cross-entropy (layers/loss.py: fp32 over this rank's V/tp columns, two small all-reduces)."""
    sp = sequence_parallel and tp > 1
    L = local_sizes(cfg, tp, sp)
    e, h, T, t, V = cfg.dtype_bytes, cfg.hidden, L.tokens, L.sp_tokens, L.vocab
    # lookup 2, mask 2, verdict column 2 (tp > 1), contiguous slice 2 units; ~8 small id-check ops
    units = 2 if tp == 1 else 8
    # bwd: the dense [V/tp, h] grad zeroed, indexed into, and the tied head's grad added
    ops = [Op("embed", "ew", fwd_bytes=units * T * h * e, bwd_bytes=(units - 1) * T * h * e + 4 * V * h * e,
              fwd_ops=8 + units // 2, bwd_ops=4)]  # fmt: skip
    if tp > 1:
        op = "reduce_scatter" if sp else "all_reduce"
        ops += _shape_check("embed", tp) if sp else []
        ops.append(Op("embed", "coll", op=op, nbytes=T * (h + 1) * e, phase="fwd"))
        if sp:
            ops.append(Op("embed", "coll", op="all_gather", nbytes=T * (h + 1) * e, phase="bwd"))
            # the replicated params' grads, one coalesced all-reduce per backward (comm/grad_sync.py)
            ops.append(Op("embed", "coll", op="all_reduce", nbytes=replicated_grad_bytes(cfg), phase="bwd"))
    ops += _residual(cfg, "embed", t)[:-1]  # embedding dropout only
    ops += _norm(cfg, "head", t) + _entry("head", T * h * e, sp, tp)
    ops.append(Op("head", "gemm", m=T, k=h, n=V, hides=True))
    fp32 = 0 if e == 4 else 2  # logits.float()
    # amax 1, subtract max 2, exp 2, sum 1, softmax divide 2 units of [T, V/tp] fp32; bwd: scatter, mul 2
    ops.append(Op("head", "ew", fwd_bytes=(8 + fp32) * T * V * 4, bwd_bytes=(2 + fp32) * T * V * 4, fwd_ops=25,
                  bwd_ops=6, ew_kind="log_softmax", elems=T * V))  # fmt: skip
    glue = EDGE_GLUE[min(tp, 2)]
    norm_tensors = 1 if cfg.rmsnorm else 2
    ops.append(Op("head", "glue", fwd_ops=glue[0], bwd_ops=glue[1], nodes=glue[2], tensors=1 + norm_tensors))
    if tp > 1:
        ops.append(Op("head", "coll", op="all_reduce", nbytes=(T + 3 + 2 * tp) * 4, phase="fwd"))  # MAX
        ops.append(Op("head", "coll", op="all_reduce", nbytes=2 * T * 4, phase="fwd"))  # target logit, sum exp
    return ops


def params_per_layer(cfg: ModelConfig, tp: int) -> float:
    """Parameters of one layer on one rank (params_per_rank's per-layer part)."""
    L = local_sizes(cfg, tp, False)
    h, d = cfg.hidden, cfg.head_dim
    col = h * (L.q + 2 * L.kv) * d + h * L.ffn * (2 if cfg.swiglu else 1)
    norms = (1 if cfg.rmsnorm else 2) * 2 * h
    biases = ((L.q + 2 * L.kv) * d + L.ffn * (2 if cfg.swiglu else 1) + 2 * h) if cfg.bias else 0
    return col + L.q * d * h + L.ffn * h + norms + biases


def params_per_rank(cfg: ModelConfig, tp: int) -> float:
    """Parameters one rank holds: sharded weights / tp, replicated norms and row biases whole, kv heads shared
    under GQA held by each rank that reads them."""
    return (
        cfg.layers * params_per_layer(cfg, tp)
        + math.ceil(cfg.vocab / tp) * cfg.hidden
        + (1 if cfg.rmsnorm else 2) * cfg.hidden
    )


def tensors_per_layer(cfg: ModelConfig) -> int:
    """Parameter tensors of one layer: projections, norms, biases."""
    # q, k, v, o, up, down (+ gate) weights and as many biases (torch.profiler: 16 AccumulateGrad per GELU block)
    return (7 if cfg.swiglu else 6) * (2 if cfg.bias else 1) + (2 if cfg.rmsnorm else 4)


def param_tensors_per_rank(cfg: ModelConfig) -> int:
    """Parameter tensors (the optimizer's per-tensor loop runs over them)."""
    return cfg.layers * tensors_per_layer(cfg) + 1 + (1 if cfg.rmsnorm else 2)


__all__ = ["PRESETS", "Local", "ModelConfig", "Op", "activation_bytes_per_layer", "block_config", "edge_ops",
           "gpt_config", "heads_feasible", "layer_flops", "layer_ops", "local_sizes", "param_tensors_per_rank",
           "params_per_layer", "params_per_rank", "replicated_grad_bytes", "tensors_per_layer"]  # fmt: skip
