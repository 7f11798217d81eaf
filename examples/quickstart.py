"""Tensor-parallel MLP on 2 ranks, checked against the dense layer.
Run: python examples/quickstart.py   or   torchrun --nproc_per_node 2 examples/quickstart.py"""

import torch

import shardwise


def main():
    mesh = shardwise.init_mesh(tp=2)  # reads RANK/WORLD_SIZE/MASTER_ADDR from the launcher
    torch.manual_seed(0)  # same seed on every rank: same input, same full weights
    dense = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    up = shardwise.ColumnParallelLinear.from_dense(dense[0], mesh)  # keeps rows  [256/tp, 64]
    down = shardwise.RowParallelLinear.from_dense(dense[2], mesh)  # keeps cols  [64, 256/tp]
    x = torch.randn(8, 64)
    y = down(torch.nn.functional.gelu(up(x)))  # one all-reduce forward; none backward (x needs no grad)
    y.sum().backward()
    error = (y - dense(x)).abs().max().item()
    print(f"rank {mesh.tp_rank}/{mesh.tp_size}: max |tp - dense| = {error:.2e}")
    return error


if __name__ == "__main__":
    import os

    if "RANK" in os.environ:  # started by torchrun
        main()
    else:
        print(shardwise.launch(main, 2))
