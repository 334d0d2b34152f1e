"""DDP equivalence worker: 1 process on the full batches vs 2 gloo processes on half batches.

Usage: python ddp_gradient_worker.py OUT_DIR PORT. Writes reference.pt, rank0.pt and rank1.pt:
{method id: final flat parameters}. Run by tests/test_gradient_training.py.
"""

import os
import sys

import torch
import torch.multiprocessing as mp

from gradient_helpers import METHODS, make_batches, split, train

STEPS, BATCH = 3, 16


def rank_main(rank: int, out_dir: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    batches = split(make_batches(STEPS, BATCH), 2, rank)
    results = {name: train(factory(), batches, strategy="ddp", devices=2, use_distributed_sampler=False)
               for name, factory in METHODS.items()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    out_dir, port = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    batches = make_batches(STEPS, BATCH)
    torch.save({name: train(factory(), batches) for name, factory in METHODS.items()},
               os.path.join(out_dir, "reference.pt"))
    mp.spawn(rank_main, args=(out_dir, port), nprocs=2, join=True)
