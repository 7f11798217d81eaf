"""Sharded checkpoints: save at tp=2, load at tp=1/3/4, consolidate, reshard offline, dp replicas, crash
safety and error messages, on real gloo ranks (3 launches: each costs seconds, so each checks a lot).

Two GPTs: 'gqa' (4 heads, 2 kv heads) and 'uneven' (6 heads, 3 kv heads: at tp=4 the q heads split
2,2,1,1 and kv heads are shared by ranks). vocab 61 is padded differently at every tp.
"""

import json
import os
import shutil
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from torch.testing import assert_close

import shardwise
from shardwise.checkpoint import consolidate, load_sharded, read_index, reshard, save_sharded
from shardwise.checkpoint import format as fmt
from shardwise.checkpoint import sharded as ckpt
from shardwise.layers import ColumnParallelLinear, VocabParallelEmbedding
from shardwise.nn import GPT, GPTConfig
from shardwise.sharding import ShardSpec, set_shard_info, shard_spec, take

CONFIGS = {
    "gqa": dict(vocab_size=61, hidden=32, num_layers=2, num_heads=4, num_kv_heads=2),
    "uneven": dict(vocab_size=61, hidden=48, num_layers=2, num_heads=6, num_kv_heads=3),
}
SAVED_SEED = 0  # the saved models; every freshly built model that loads uses another seed
FRESH_SEED = 99
LOGITS_TOL = dict(atol=1e-6, rtol=0.0)


def _ids() -> torch.Tensor:
    return torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(7))


def _set_head_layouts(model: GPT) -> None:
    """The layout hints reshard needs for attention parameters (multi-range / replicated at some tp), written
    here by hand (the attention sets the same ones itself)."""
    for block in model.blocks:
        attn = block.attn
        hint = dict(kind="heads", num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads, head_dim=attn.head_dim)
        for proj, role in ((attn.q_proj, "q"), (attn.k_proj, "kv"), (attn.v_proj, "kv")):
            set_shard_info(proj.weight, layout={**hint, "role": role})
            set_shard_info(proj.bias, layout={**hint, "role": role})
        set_shard_info(attn.o_proj.weight, layout={**hint, "role": "o"})


def _build(name: str, mesh, seed: int) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**CONFIGS[name]), mesh)
    _set_head_layouts(model)
    return model


@cache
def _dense_state(name: str, seed: int = SAVED_SEED) -> dict[str, torch.Tensor]:
    return _build(name, shardwise.Mesh.single(), seed).state_dict()


def _expected_local(full: torch.Tensor, spec: ShardSpec | None) -> torch.Tensor:
    """A rank's shard of a dense tensor, zero-padded past `valid` as the layer pads it."""
    if spec is not None and spec.valid is not None and spec.full > full.shape[spec.dim]:
        pad = list(full.shape)
        pad[spec.dim] = spec.full - full.shape[spec.dim]
        full = torch.cat([full, full.new_zeros(pad)], spec.dim)
    return take(full, spec)


def _check_values(model: nn.Module, dense: dict[str, torch.Tensor], where: str) -> None:
    state = model.state_dict(keep_vars=True)
    assert set(state) == set(dense), where
    for key, value in state.items():
        expected = _expected_local(dense[key], shard_spec(value))
        assert torch.equal(value.detach(), expected), f"{where}: {key} differs from the saved model"


def _load_and_check(mesh, name: str, directory: str, check_layout: bool):
    """Load into a fresh model (other seed) and check every local tensor against the dense saved model."""
    model = _build(name, mesh, FRESH_SEED)
    ids = _ids()
    before = model.full_logits(model(ids))
    result = load_sharded(model, directory)
    where = f"{name} from {Path(directory).name} at tp={mesh.tp_size} rank {mesh.tp_rank}"
    _check_values(model, _dense_state(name), where)
    if check_layout:  # a resharded checkpoint's files line up with the model's own shards
        index = read_index(directory)
        for key, value in model.state_dict(keep_vars=True).items():
            spec, saved = shard_spec(value), index["tensors"][key]["specs"]
            assert (saved is None) == (spec is None), f"{where}: {key}"
            if spec is not None:
                assert ShardSpec.from_json(saved[mesh.tp_rank]) == spec, f"{where}: {key}: {saved[mesh.tp_rank]}"
    return before, model.full_logits(model(ids)), result.extra


# ------------------------------------------------------------------------------------- rank functions


def _rank_load(tp: int, jobs):
    mesh = shardwise.init_mesh(tp)
    return [_load_and_check(mesh, *job) for job in jobs]


def _rank_save_then_crash(paths: dict[str, str]):
    """Every multi-rank save, in one launch (each launch costs seconds):
    1. tp=1 x dp=2: the dp replica must not write;
    2. tp=2: both models; their tp=2 logits go to paths["logits"] (the launch ends in a crash);
    3. tp=2, over a copy of the gqa checkpoint: a save where tp rank 1 fails writing its shard (every
       rank must raise, none hang), then one where rank 0 dies (os._exit) after all shards are
       written but before the index."""
    save_sharded(_build("gqa", shardwise.init_mesh(1, 2), SAVED_SEED), paths["dp"])
    shardwise.mesh.destroy_mesh()  # another grid over the same ranks
    mesh = shardwise.init_mesh(2)
    logits = {}
    for name in CONFIGS:
        model = _build(name, mesh, SAVED_SEED)
        save_sharded(model, paths[name], extra={"config": CONFIGS[name]})
        logits[name] = model.full_logits(model(_ids()))
    if mesh.tp_rank == 0:
        torch.save(logits, paths["logits"])
        shutil.copytree(paths["gqa"], paths["overwritten"])
    dist.barrier()
    directory = paths["overwritten"]
    model = _build("gqa", mesh, seed=1)
    write_shard = ckpt.write_shard_file

    def failing_write(path, tensors, metadata):
        if mesh.tp_rank == 1:
            raise OSError("disk full (injected)")
        write_shard(path, tensors, metadata)

    ckpt.write_shard_file = failing_write
    with pytest.raises(RuntimeError, match=r"tp rank 1: OSError: disk full \(injected\)"):
        save_sharded(model, directory)
    ckpt.write_shard_file = write_shard
    _load_and_check(mesh, "gqa", directory, check_layout=False)  # the old checkpoint, still there

    def die(*args, **kwargs):
        os._exit(3)

    ckpt.write_index = die
    save_sharded(model, directory)
    raise AssertionError("save_sharded should have died")


# -------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Runs _rank_save_then_crash: both models saved at tp=2 and their tp=2 logits; the dp=2 save; the
    gqa checkpoint copy that two failed saves tried to overwrite."""
    root = tmp_path_factory.mktemp("ckpt")
    paths = {name: str(root / f"{name}-tp2") for name in CONFIGS}
    paths |= {"dp": str(root / "gqa-dp2"), "overwritten": str(root / "overwritten"), "logits": str(root / "logits.pt")}
    with pytest.raises(shardwise.RankFailure, match="rank 0 exited with code 3"):
        shardwise.launch(_rank_save_then_crash, 2, paths)
    return {"root": root, "dirs": {name: paths[name] for name in CONFIGS}, "logits": torch.load(paths["logits"]),
            "dp": Path(paths["dp"]), "overwritten": Path(paths["overwritten"])}  # fmt: skip


@pytest.fixture(scope="module")
def resharded(saved):
    """Offline reshards: gqa -> 4, uneven -> 3 and 4, and gqa -> 4 from an index with the hints removed."""
    root, dirs = saved["root"], saved["dirs"]
    out = {}
    for name, tp in (("gqa", 4), ("uneven", 3), ("uneven", 4)):
        out[name, tp] = str(root / f"{name}-tp{tp}")
        reshard(dirs[name], out[name, tp], tp)
    nohint = root / "gqa-nohint-tp2"
    shutil.copytree(dirs["gqa"], nohint)
    _edit_index(nohint, lambda index: [entry.update(layout=None) for entry in index["tensors"].values()])
    out["gqa-nohint", 4] = str(root / "gqa-nohint-tp4")
    reshard(nohint, out["gqa-nohint", 4], 4)  # single ranges at tp=2: a balanced split, no hint needed
    return out


def _edit_index(directory, edit) -> None:
    path = Path(directory) / "index.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))


def _shard_dirs(directory) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith("shards-"))


# ----------------------------------------------------------------------------------------------- tests


def test_saved_files_and_index(saved):
    for name, directory in saved["dirs"].items():
        index = read_index(directory)
        assert index["tp_size"] == 2 and index["version"] == fmt.VERSION
        assert index["extra"] == {"config": CONFIGS[name]}
        assert _shard_dirs(directory) == [index["shard_dir"]]
        files = sorted(p.name for p in (Path(directory) / index["shard_dir"]).iterdir())
        assert files == ["rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"]
        embed = index["tensors"]["embed.weight"]
        assert embed["shape"] == [61, 32 if name == "gqa" else 48]  # dense: the padding row is not saved
        assert [piece["ranges"] for piece in embed["pieces"]] == [[[0, 31]], [[31, 61]]]
        norm = index["tensors"]["norm.weight"]
        assert norm["specs"] is None and len(norm["pieces"]) == 1  # replicated: stored once
        assert index["tensors"]["blocks.0.attn.o_proj.weight"]["layout"]["role"] == "o"
    k_specs = read_index(saved["dirs"]["uneven"])["tensors"]["blocks.0.attn.k_proj.weight"]["specs"]
    assert [s["ranges"] for s in k_specs] == [[[0, 16]], [[8, 24]]] and k_specs[0]["replicated"]


def test_load_at_tp1(saved):
    mesh = shardwise.Mesh.single()
    for name, directory in saved["dirs"].items():
        before, after, extra = _load_and_check(mesh, name, directory, check_layout=False)
        assert not torch.allclose(before, saved["logits"][name], atol=1e-3)
        assert_close(after, saved["logits"][name], **LOGITS_TOL)
        assert extra == {"config": CONFIGS[name]}


def test_consolidate_equals_dense_state_dict(saved, resharded):
    for name, directory in [*saved["dirs"].items(), *((key[0].split("-")[0], d) for key, d in resharded.items())]:
        full, dense = consolidate(directory), _dense_state(name)
        assert list(full) == list(dense), directory
        for key in dense:
            assert full[key].dtype == dense[key].dtype and torch.equal(full[key], dense[key]), f"{directory}: {key}"


def test_load_at_tp3(saved, resharded):
    dirs = saved["dirs"]
    jobs = [("gqa", dirs["gqa"], False), ("uneven", dirs["uneven"], False), ("uneven", resharded["uneven", 3], True)]
    results = shardwise.launch(_rank_load, 3, 3, jobs)
    for (name, _, _), (before, after, _) in zip(jobs, results[0], strict=True):
        assert not torch.allclose(before, saved["logits"][name], atol=1e-3)
        assert_close(after, saved["logits"][name], **LOGITS_TOL)


def test_load_at_tp4(saved, resharded):
    dirs = saved["dirs"]
    jobs = [
        ("gqa", dirs["gqa"], False),
        ("gqa", resharded["gqa", 4], True),
        ("gqa", resharded["gqa-nohint", 4], False),  # balanced kv files that do not line up with the kv heads
        ("uneven", dirs["uneven"], False),
        ("uneven", resharded["uneven", 4], True),  # heads 2,2,1,1; kv heads shared by ranks 2 and 3
    ]
    results = shardwise.launch(_rank_load, 4, 4, jobs)
    for (name, _, _), (_, after, _) in zip(jobs, results[0], strict=True):
        assert_close(after, saved["logits"][name], **LOGITS_TOL)
    index = read_index(resharded["uneven", 4])
    assert len(index["files"]) == 4 and index["extra"] == {"config": CONFIGS["uneven"]}
    v_specs = index["tensors"]["blocks.1.attn.v_proj.bias"]["specs"]
    assert [s["ranges"] for s in v_specs] == [[[0, 8]], [[8, 16]], [[16, 24]], [[16, 24]]] and v_specs[0]["replicated"]


def test_reshard_needs_a_layout_it_can_derive(saved, tmp_path):
    src = tmp_path / "nohint"
    shutil.copytree(saved["dirs"]["uneven"], src)
    _edit_index(src, lambda index: [entry.update(layout=None) for entry in index["tensors"].values()])
    with pytest.raises(ValueError, match=r"cannot reshard blocks\.0\.attn\.k_proj\.weight: .*replicated.*layout hint"):
        reshard(src, tmp_path / "out", 4)
    assert not (tmp_path / "out").exists()  # layouts are all worked out before anything is written

    wrong = tmp_path / "wrong"
    shutil.copytree(saved["dirs"]["uneven"], wrong)
    _edit_index(wrong, lambda index: index["tensors"]["blocks.0.attn.q_proj.weight"]["layout"].update(role="kv"))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q_proj\.weight: .*at the saved tp=2"):
        reshard(wrong, tmp_path / "out", 3)
    with pytest.raises(ValueError, match=r"cannot reshard blocks\.0\.attn\.q_proj\.weight to tp=7: num_heads=6"):
        reshard(saved["dirs"]["uneven"], tmp_path / "out", 7)
    with pytest.raises(ValueError, match="positive integer"):
        reshard(saved["dirs"]["uneven"], tmp_path / "out", 0)


def test_save_with_dp_replicas(saved):
    dp_directory = saved["dp"]
    index = read_index(dp_directory)
    assert index["files"] == [f"{index['shard_dir']}/rank-00000-of-00001.safetensors"]
    assert os.listdir(dp_directory / index["shard_dir"]) == ["rank-00000-of-00001.safetensors"]
    full, dense = consolidate(dp_directory), _dense_state("gqa")
    assert list(full) == list(dense) and all(torch.equal(full[k], dense[k]) for k in dense)


def test_interrupted_save_leaves_old_checkpoint(saved):
    directory, old_shards = saved["overwritten"], _shard_dirs(saved["dirs"]["gqa"])
    # Both failed saves left their shards behind, in folders the index does not name.
    assert len(_shard_dirs(directory)) == 3 and [read_index(directory)["shard_dir"]] == old_shards
    _, after, _ = _load_and_check(shardwise.Mesh.single(), "gqa", str(directory), check_layout=False)
    assert_close(after, saved["logits"]["gqa"], **LOGITS_TOL)
    # The next save that completes replaces it and removes every stale shard folder.
    save_sharded(_build("gqa", shardwise.Mesh.single(), seed=1), directory)
    assert _shard_dirs(directory) == [read_index(directory)["shard_dir"]]
    model = _build("gqa", shardwise.Mesh.single(), FRESH_SEED)
    load_sharded(model, directory)
    _check_values(model, _dense_state("gqa", 1), "after overwrite")


class _Tied(nn.Module):
    """An embedding tied to an output layer under a second name, a persistent and a scratch buffer."""

    def __init__(self, mesh, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.mesh = mesh
        self.embed = VocabParallelEmbedding(61, 8, mesh)
        self.head = nn.Linear(8, 61, bias=False)
        self.head.weight = self.embed.weight
        self.norm = nn.LayerNorm(8)
        nn.init.normal_(self.norm.weight)
        self.register_buffer("step", torch.tensor(seed))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)

    def forward(self, ids):
        return F.linear(self.norm(self.embed(ids)), self.head.weight)


def test_tied_parameters_and_buffers(tmp_path):
    mesh = shardwise.Mesh.single()
    model = _Tied(mesh, seed=7)
    save_sharded(model, tmp_path / "a")
    index = read_index(tmp_path / "a")
    assert index["aliases"] == {"head.weight": "embed.weight"}
    assert set(index["tensors"]) == {"embed.weight", "norm.weight", "norm.bias", "step"}
    reshard(tmp_path / "a", tmp_path / "b", 2)  # the alias survives a reshard
    dense = model.state_dict()
    for directory in ("a", "b"):
        full = consolidate(tmp_path / directory)
        assert list(full) == list(dense) and full["head.weight"] is full["embed.weight"]
        assert all(torch.equal(full[k], dense[k]) for k in dense)
        fresh = _Tied(mesh, seed=8)
        load_sharded(fresh, tmp_path / directory)
        assert fresh.head.weight is fresh.embed.weight and int(fresh.step) == 7
        assert all(torch.equal(v, dense[k]) for k, v in fresh.state_dict().items())


class _FusedQKV(nn.Module):
    """A fused q|k|v projection (6 heads, 2 kv heads, head_dim 2: [20, 4]) held whole at tp=1."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.mesh = shardwise.Mesh.single()
        self.qkv = ColumnParallelLinear(4, 20, mesh=self.mesh, out_ranges=[(0, 12), (12, 16), (16, 20)])
        for param in self.qkv.parameters():
            set_shard_info(param, layout={"kind": "fused_qkv", "num_heads": 6, "num_kv_heads": 2, "head_dim": 2})
        set_shard_info(self.qkv.weight, transposed=True)  # as if the dense model stored it [in, out] (Conv1D)


def test_reshard_fused_qkv(tmp_path):
    model = _FusedQKV(seed=3)
    save_sharded(model, tmp_path / "tp1")
    reshard(tmp_path / "tp1", tmp_path / "tp4", 4)
    # tp=4: q heads 2,2,1,1; kv heads (group 3) {0}, {0, 1}, {1}, {1}; k block at row 12, v block at 16.
    expected = [[[0, 4], [12, 14], [16, 18]], [[4, 8], [12, 16], [16, 20]],
                [[8, 10], [14, 16], [18, 20]], [[10, 12], [14, 16], [18, 20]]]  # fmt: skip
    index = read_index(tmp_path / "tp4")
    for key in ("qkv.weight", "qkv.bias"):
        specs = [ShardSpec.from_json(s) for s in index["tensors"][key]["specs"]]
        assert [[list(r) for r in spec.ranges] for spec in specs] == expected and specs[0].replicated
        for rank, spec in enumerate(specs):
            with safe_open(str(tmp_path / "tp4" / index["files"][rank]), framework="pt") as f:
                assert torch.equal(f.get_tensor(key), take(getattr(model.qkv, key[4:]).detach(), spec))
    reshard(tmp_path / "tp4", tmp_path / "tp3", 3)  # from multi-range, replicated shards
    for directory in ("tp4", "tp3"):
        full = consolidate(tmp_path / directory)
        assert torch.equal(full["qkv.weight"], model.qkv.weight.detach().t())  # the dense [in, out] layout
        assert torch.equal(full["qkv.bias"], model.qkv.bias.detach())
        fresh = _FusedQKV(seed=4)
        load_sharded(fresh, tmp_path / directory)
        assert torch.equal(fresh.qkv.weight, model.qkv.weight) and torch.equal(fresh.qkv.bias, model.qkv.bias)


def test_bad_inputs(saved, tmp_path):
    mesh = shardwise.Mesh.single()
    directory = saved["dirs"]["gqa"]
    model = _build("gqa", mesh, FRESH_SEED)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sharded(model, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="index.json is missing"):
        consolidate(tmp_path)

    wide = GPT(GPTConfig(**{**CONFIGS["gqa"], "hidden": 48}), mesh)
    untouched = {k: v.clone() for k, v in wide.state_dict().items()}
    message = r"embed\.weight: checkpoint full shape \(61, 32\), model full shape \(61, 48\)"
    with pytest.raises(ValueError, match=message):
        load_sharded(wide, directory)
    assert all(torch.equal(v, untouched[k]) for k, v in wide.state_dict().items())  # nothing half-loaded

    shallow = GPT(GPTConfig(**{**CONFIGS["gqa"], "num_layers": 1}), mesh)
    with pytest.raises(ValueError, match=r"in the checkpoint but not the model \(16\): blocks\.1\.norm1\.weight"):
        load_sharded(shallow, directory)
    result = load_sharded(shallow, directory, strict=False)
    assert len(result.unexpected_keys) == 16 and result.missing_keys == []
    assert torch.equal(shallow.blocks[0].mlp.up.weight, _dense_state("gqa")["blocks.0.mlp.up.weight"])
    deep = GPT(GPTConfig(**{**CONFIGS["gqa"], "num_layers": 3}), mesh)
    with pytest.raises(ValueError, match=r"missing from the checkpoint \(16\): blocks\.2\.norm1\.weight"):
        load_sharded(deep, directory)

    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    (broken / read_index(broken)["files"][1]).unlink()
    with pytest.raises(FileNotFoundError, match=r"rank-00001-of-00002\.safetensors .* is missing"):
        load_sharded(model, broken)
    with pytest.raises(ValueError, match="extra must be JSON-able"):
        save_sharded(model, tmp_path / "c", extra={"dtype": torch.float32})
    assert not (tmp_path / "c").exists()
