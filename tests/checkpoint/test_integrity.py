"""Checkpoint integrity: a flipped byte, a truncated file or a corrupt header fails the load (and consolidate,
reshard) naming the file (and the tensor), on every rank; version 1 indexes (no checksums) still load."""

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import shardwise
from shardwise.checkpoint import CheckpointError, consolidate, load_sharded, read_index, reshard, save_sharded
from shardwise.nn import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=61, hidden=32, num_layers=1, num_heads=4)
VICTIM = "blocks.0.mlp.up.weight"  # sharded: at tp=2 rank 1 never reads rank 0's rows of it


def _gpt(mesh, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(CONFIG, mesh)


def _flip(path: Path, tensor: str) -> None:
    """Flip one byte in the middle of `tensor`'s data (safetensors: u64 header size, JSON header, data)."""
    raw = bytearray(path.read_bytes())
    (size,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8 : 8 + size])[tensor]["data_offsets"]
    raw[8 + size + (begin + end) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _rank_load_corrupt(directory: str):
    mesh = shardwise.init_mesh(2)
    save_sharded(_gpt(mesh, seed=0), directory)
    if mesh.tp_rank == 0:
        _flip(Path(directory) / read_index(directory)["files"][0], VICTIM)
    dist.barrier()
    fresh = _gpt(mesh, seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    try:
        load_sharded(fresh, directory)
        message = None
    except CheckpointError as exc:
        message = str(exc)
    return message, all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_flipped_byte_fails_the_load_on_every_rank(tmp_path):
    results = shardwise.launch(_rank_load_corrupt, 2, str(tmp_path / "ckpt"))
    for rank, (message, unchanged) in enumerate(results):
        assert message and "rank-00000-of-00002.safetensors" in message and f"'{VICTIM}'" in message, (rank, message)
        assert "corrupt" in message and unchanged, (rank, message)
    for run in (lambda: consolidate(tmp_path / "ckpt"), lambda: reshard(tmp_path / "ckpt", tmp_path / "out", 1)):
        with pytest.raises(CheckpointError, match=rf"rank-00000-of-00002\.safetensors: tensor '{VICTIM}' is corrupt"):
            run()


@pytest.fixture()
def saved(tmp_path):
    mesh = shardwise.Mesh.single()
    model = _gpt(mesh, seed=0)
    save_sharded(model, tmp_path / "good")
    reshard(tmp_path / "good", tmp_path / "tp2", 2)  # two files, for a damaged one among good ones
    return tmp_path, model.state_dict()


def _damaged_copy(root: Path, name: str, damage) -> tuple[Path, Path]:
    directory = root / name
    shutil.copytree(root / "tp2", directory)
    victim = directory / read_index(directory)["files"][1]
    damage(victim)
    return directory, victim


def test_truncated_file_and_corrupt_header_name_the_file(saved):
    root, dense = saved
    model = _gpt(shardwise.Mesh.single(), seed=1)

    def truncate(path):
        path.write_bytes(path.read_bytes()[:-100])

    def garble_header(path):  # same size, so only the header tells
        raw = bytearray(path.read_bytes())
        raw[8:24] = b"\xff" * 16
        path.write_bytes(bytes(raw))

    for name, damage, what in (("trunc", truncate, "truncated"), ("header", garble_header, "corrupt header")):
        directory, victim = _damaged_copy(root, name, damage)
        for run in (lambda d=directory: load_sharded(model, d), lambda d=directory: consolidate(d)):
            with pytest.raises(CheckpointError, match=str(victim).replace(".", r"\.")) as info:
                run()
            assert what in str(info.value), str(info.value)
    # Damage shardwise only sees by the checksum: a flipped byte in a replicated tensor.
    directory, victim = _damaged_copy(root, "flip", lambda path: None)
    _flip(directory / read_index(directory)["files"][0], "norm.weight")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"rank-00000-of-00002\.safetensors: tensor 'norm\.weight' is corrupt"):
        load_sharded(model, directory)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded


def test_version_1_index_without_checksums_still_loads(saved):
    root, dense = saved
    old = root / "v1"
    shutil.copytree(root / "tp2", old)
    path = old / "index.json"
    index = json.loads(path.read_text())
    index["version"] = 1
    del index["file_bytes"]
    for entry in index["tensors"].values():
        for piece in entry["pieces"]:
            del piece["sha256"]
    path.write_text(json.dumps(index))
    model = _gpt(shardwise.Mesh.single(), seed=1)
    load_sharded(model, old)
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())
    full = consolidate(old)
    assert all(torch.equal(full[k], dense[k]) for k in dense)
    index["version"] = 3
    path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="format version 3, this shardwise reads up to 2: upgrade shardwise"):
        load_sharded(model, old)
