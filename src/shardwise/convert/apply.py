"""Convert a dense model to tensor parallelism in place, by a plan over module names.

    plan = {
        "model.embed_tokens": "vocab",
        "model.layers.*.self_attn.q_proj": Heads("q", num_heads=9, num_kv_heads=3, head_dim=64),
        "model.layers.*.self_attn.k_proj": Heads("k", 9, 3, 64),
        "model.layers.*.self_attn.v_proj": Heads("v", 9, 3, 64),
        "model.layers.*.self_attn.o_proj": Heads("o", 9, 3, 64),
        "model.layers.*.mlp.gate_proj": "colwise",
        "model.layers.*.mlp.down_proj": "rowwise",
        "lm_head": "colwise_gather",
    }
    parallelize(model, plan, mesh)

Each matched module is replaced by a shardwise layer holding this rank's slice of its weights, so the
model computes what it computed before. Patterns are fnmatch wildcards over `named_modules()` names,
matched per dotted component (`*` never spans a dot).
Styles: "colwise", "rowwise", "vocab", "colwise_gather", Heads(...) (separate q/k/v/o projections
that know head boundaries, GQA and uneven splits included), FusedQKV(...) (one projection holding
q|k|v, e.g. GPT-2's c_attn), and Patch(fn) (set attributes on a module, e.g. its local head count).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..heads import HeadLayout, head_layout
from ..layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from ..layers.embedding import TiedLMHead
from ..layers.linear import adopt_shards
from ..mesh import Mesh, resolve

__all__ = ["FusedQKV", "Heads", "Patch", "parallelize"]


def _dense_linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
    """(weight [out, in], bias [out] or None, in, out) of an nn.Linear or a transformers Conv1D,
    which stores its weight transposed ([in, out])."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias, module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        weight = module.weight.t()
        return weight, module.bias, weight.shape[1], weight.shape[0]
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def _sharded_linear(cls, module: nn.Module, mesh: Mesh, **kwargs) -> nn.Module:
    weight, bias, fin, fout = _dense_linear(module)
    layer = cls(fin, fout, bias is not None, mesh=mesh, device="meta", dtype=weight.dtype, **kwargs)
    adopt_shards(layer, {"weight": weight} | ({"bias": bias} if bias is not None else {}))
    if not isinstance(module, nn.Linear):
        # The dense model stored it [in, out] (Conv1D): checkpoints transpose back to that layout.
        layer.weight.tp_transposed = True
    return layer


@dataclass(frozen=True)
class Heads:
    """A projection of an attention module, sharded on head boundaries.

    role "q": output rows of this rank's q heads; "k"/"v": rows of the kv heads those q heads read;
    "o": input columns of this rank's q heads (row-parallel). Uneven splits deal whole heads out
    (9 heads on tp=2: 5 and 4); a kv head read on several ranks is held by each, grads summed.
    `expand_kv=True` (what Hugging Face attention needs when a kv group is cut across ranks):
    k/v give one kv head per local q head, so a plain repeat factor of 1 maps them.
    """

    role: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    expand_kv: bool = False

    def __post_init__(self):
        if self.role not in ("q", "k", "v", "o"):
            raise ValueError(f"Heads role must be 'q', 'k', 'v' or 'o', got {self.role!r}")

    def layout(self, mesh: Mesh) -> HeadLayout:
        return head_layout(self.num_heads, self.num_kv_heads, mesh.tp_size, mesh.tp_rank)

    def kv_rows(self, mesh: Mesh) -> tuple[list[tuple[int, int]], bool]:
        """(row ranges of this rank's k or v weight, whether any kv row is held twice anywhere)."""
        d = self.head_dim
        layouts = [head_layout(self.num_heads, self.num_kv_heads, mesh.tp_size, r) for r in range(mesh.tp_size)]
        lay = layouts[mesh.tp_rank]
        if self.expand_kv and lay.uniform_repeat is None:
            rows = [(kv * d + lay.kv_start * d, (kv + 1) * d + lay.kv_start * d) for kv in lay.kv_index]
        else:
            rows = [(lay.kv_start * d, lay.kv_stop * d)]
        duplicated = self.expand_kv and any(other.uniform_repeat is None for other in layouts)
        return rows, lay.kv_shared or duplicated


@dataclass(frozen=True)
class FusedQKV:
    """One projection whose output is q|k|v stacked ([(num_heads + 2 * num_kv_heads) * head_dim, in]):
    each rank keeps the rows of its q heads, and of the kv heads they read, from each block."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Patch:
    """Call fn(module, mesh) on the matched module instead of replacing it: set local head counts
    and the like on modules that compute on heads."""

    fn: Callable[[nn.Module, Mesh], None]


_STRING_STYLES = ("colwise", "rowwise", "vocab", "colwise_gather")


def _convert(style, module: nn.Module, name: str, mesh: Mesh, converted: dict[int, nn.Module]) -> nn.Module | None:
    kind = type(module).__name__
    try:
        if style == "vocab":
            if not isinstance(module, nn.Embedding):
                raise TypeError(f"expected nn.Embedding, got {kind}")
            new = VocabParallelEmbedding.from_dense(module, mesh)
            converted[id(module.weight)] = new
            return new
        if style == "colwise":
            return _sharded_linear(ColumnParallelLinear, module, mesh)
        if style == "rowwise":
            return _sharded_linear(RowParallelLinear, module, mesh)
        if style == "colwise_gather":
            embedding = converted.get(id(getattr(module, "weight", None)))
            if embedding is not None:  # tied to an embedding already sharded: share its table
                return TiedLMHead(embedding, gather_output=True, bias=getattr(module, "bias", None))
            return _sharded_linear(ColumnParallelLinear, module, mesh, gather_output=True)
        if isinstance(style, Heads):
            return _convert_heads(style, module, mesh)
        if isinstance(style, FusedQKV):
            return _convert_fused(style, module, mesh)
        if isinstance(style, Patch):
            style.fn(module, mesh)
            return None
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"cannot shard {name!r} ({kind}) as {style!r}: {exc}") from exc
    raise ValueError(f"unknown style {style!r} for {name!r}; use one of {_STRING_STYLES}, Heads, FusedQKV or Patch")


def _convert_heads(style: Heads, module: nn.Module, mesh: Mesh) -> nn.Module:
    _, _, fin, fout = _dense_linear(module)
    lay, d = style.layout(mesh), style.head_dim
    expected = (style.num_kv_heads if style.role in "kv" else style.num_heads) * d
    got = fin if style.role == "o" else fout
    if got != expected:
        raise ValueError(f"role {style.role!r} expects {expected} features (heads x head_dim), the module has {got}")
    q_cols = (lay.q_start * d, lay.q_stop * d)
    if style.role == "q":
        new = _sharded_linear(ColumnParallelLinear, module, mesh, out_ranges=[q_cols])
    elif style.role == "o":
        new = _sharded_linear(RowParallelLinear, module, mesh, in_range=q_cols)
    else:
        rows, replicated = style.kv_rows(mesh)
        new = _sharded_linear(ColumnParallelLinear, module, mesh, out_ranges=rows, replicated=replicated)
    layout_hint = {"kind": "heads", "num_heads": style.num_heads, "num_kv_heads": style.num_kv_heads,
                   "head_dim": d, "role": {"k": "kv", "v": "kv"}.get(style.role, style.role),
                   "expand_kv": style.expand_kv}  # fmt: skip
    for param in new.parameters(recurse=False):
        if getattr(param, "tp_shard", None) is not None:
            param.tp_layout = layout_hint
    return new


def _convert_fused(style: FusedQKV, module: nn.Module, mesh: Mesh) -> nn.Module:
    _, _, _, fout = _dense_linear(module)
    nh, nkv, d = style.num_heads, style.num_kv_heads, style.head_dim
    if fout != (nh + 2 * nkv) * d:
        raise ValueError(f"a fused q|k|v projection of {nh}+2x{nkv} heads x {d} has {(nh + 2 * nkv) * d} outputs, "
                         f"this one has {fout}")  # fmt: skip
    lay = head_layout(nh, nkv, mesh.tp_size, mesh.tp_rank)
    k_off, v_off = nh * d, (nh + nkv) * d
    rows = [(lay.q_start * d, lay.q_stop * d),
            (k_off + lay.kv_start * d, k_off + lay.kv_stop * d),
            (v_off + lay.kv_start * d, v_off + lay.kv_stop * d)]  # fmt: skip
    new = _sharded_linear(ColumnParallelLinear, module, mesh, out_ranges=rows, replicated=lay.kv_shared)
    for param in new.parameters(recurse=False):
        param.tp_layout = {"kind": "fused_qkv", "num_heads": nh, "num_kv_heads": nkv, "head_dim": d}
    return new


def _matches(name: str, pattern: str) -> bool:
    """fnmatch per dotted component: `layers.*.mlp` matches `layers.3.mlp`, never `layers.3.attn.mlp`,
    so a pattern for a block's output projection cannot also catch the attention's."""
    parts, pattern_parts = name.split("."), pattern.split(".")
    return len(parts) == len(pattern_parts) and all(
        fnmatch.fnmatchcase(part, pat) for part, pat in zip(parts, pattern_parts, strict=True)
    )


def _match(plan: dict, names: list[str]) -> dict[str, object]:
    """module name -> style; every pattern must match something, no module may match twice."""
    chosen: dict[str, object] = {}
    by_pattern: dict[str, str] = {}
    for pattern, style in plan.items():
        if isinstance(style, str) and style not in _STRING_STYLES:
            raise ValueError(f"unknown style {style!r} for {pattern!r}; use one of {_STRING_STYLES}")
        hits = [n for n in names if n and _matches(n, pattern)]
        if not hits:
            close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.4)
            sample = close or [n for n in names if n][:10]
            raise ValueError(
                f"plan pattern {pattern!r} matches no module; modules that exist include: {', '.join(sample)} "
                f"({len(names) - 1} in all; print(dict(model.named_modules()).keys()) lists them)"
            )
        for name in hits:
            if name in chosen:
                raise ValueError(f"module {name!r} is matched by both {by_pattern[name]!r} and {pattern!r}")
            chosen[name] = style
            by_pattern[name] = pattern
    return chosen


def parallelize(model: nn.Module, plan: dict, mesh: Mesh | None = None) -> nn.Module:
    """Shard `model` in place by `plan` ({module-name pattern: style}) and return it."""
    mesh = resolve(mesh)
    modules = dict(model.named_modules())
    chosen = _match(plan, list(modules))
    # Embeddings first, so an output layer tied to one can share the sharded table.
    order = sorted(chosen, key=lambda n: (chosen[n] != "vocab", list(modules).index(n)))
    converted: dict[int, nn.Module] = {}
    for name in order:
        new = _convert(chosen[name], modules[name], name, mesh, converted)
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, new)
    _check_ties(model, converted)
    return model


def _check_ties(model: nn.Module, converted: dict[int, nn.Module]) -> None:
    """A dense parameter that was tied to a sharded embedding must not survive unsharded elsewhere."""
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in converted:
            raise ValueError(
                f"{name!r} is tied to an embedding that was sharded, but was itself left dense; add it to the plan "
                "as 'colwise_gather' (an output layer) so it shares the sharded table"
            )
