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
q|k|v, e.g. GPT-2's c_attn), Patch(fn) (set attributes on a module, e.g. its local head count), the
sequence-parallel ones (SequenceParallelNorm, SplitSequence, GatherSequence; see sequence.py), or any
object with `apply(module, name, mesh) -> module` (see styles.py). A tuple of styles applies each in
turn to what the previous returned (convert, then hook: ("colwise_gather", GatherSequence())).
"""

from __future__ import annotations

import difflib
import fnmatch

import torch.nn as nn

from ..mesh import Mesh, resolve
from .sequence import GatherSequence, SequenceParallelNorm, SplitSequence
from .styles import Colwise, FusedQKV, Heads, Patch, Rowwise, Vocab, as_style, sharded_table

__all__ = ["Colwise", "FusedQKV", "GatherSequence", "Heads", "Patch", "Rowwise", "SequenceParallelNorm",
           "SplitSequence", "Vocab", "parallelize"]  # fmt: skip


def _styles(value, where: str) -> tuple:
    values = value if isinstance(value, tuple) else (value,)
    if not values:
        raise ValueError(f"empty tuple of styles for {where!r}")
    return tuple(as_style(v, where) for v in values)


def _convert(styles: tuple, module: nn.Module, name: str, mesh: Mesh) -> nn.Module:
    for style in styles:
        kind = type(module).__name__
        try:
            module = style.apply(module, name, mesh)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"cannot shard {name!r} ({kind}) as {style!r}: {exc}") from exc
        if not isinstance(module, nn.Module):
            raise TypeError(f"style {style!r} returned {type(module).__name__} for {name!r}; apply must return "
                            "the module that takes its place (the module itself if changed in place)")  # fmt: skip
    return module


def _matches(name: str, pattern: str) -> bool:
    """fnmatch per dotted component: `layers.*.mlp` matches `layers.3.mlp`, never `layers.3.attn.mlp`,
    so a pattern for a block's output projection cannot also catch the attention's."""
    parts, pattern_parts = name.split("."), pattern.split(".")
    return len(parts) == len(pattern_parts) and all(
        fnmatch.fnmatchcase(part, pat) for part, pat in zip(parts, pattern_parts, strict=True)
    )


def _match(plan: dict, names: list[str]) -> dict[str, tuple]:
    """module name -> its styles (objects); every pattern must match something, no module may match twice."""
    chosen: dict[str, object] = {}
    by_pattern: dict[str, str] = {}
    for pattern, style in plan.items():
        style = _styles(style, pattern)
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
    # Embeddings (order 0) first, so an output layer tied to one can share the sharded table.
    names = list(modules)
    order = sorted(chosen, key=lambda n: (min(getattr(s, "order", 1) for s in chosen[n]), names.index(n)))
    for name in order:
        new = _convert(chosen[name], modules[name], name, mesh)
        if new is not modules[name]:
            parent_name, _, child = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, child, new)
    _check_ties(model)
    return model


def _check_ties(model: nn.Module) -> None:
    """A dense parameter that was tied to a sharded embedding must not survive unsharded elsewhere."""
    for name, param in model.named_parameters(remove_duplicate=False):
        if sharded_table(param) is not None:
            raise ValueError(
                f"{name!r} is tied to an embedding that was sharded, but was itself left dense; add it to the plan "
                "as 'colwise_gather' (an output layer) so it shares the sharded table"
            )
