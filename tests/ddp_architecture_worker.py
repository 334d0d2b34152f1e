"""DDP worker for the sharing architectures: 1 process on full batches vs 2 gloo processes on half
batches, each running a param-mode gradient method and the negative-transfer monitor.

Usage: python ddp_architecture_worker.py OUT_DIR PORT. Writes reference.pt, rank0.pt, rank1.pt:
{architecture: (final flat parameters, monitor measurements)}. Run by tests/test_sharing_ddp.py.
"""

import os
import sys

import torch
import torch.multiprocessing as mp

from architecture_zoo import batch, build
from gradient_helpers import flat_parameters, split
from helpers import quiet_trainer
from mtl_lightning.gradients import UPGrad
from mtl_lightning.monitoring import NegativeTransferMonitor

ARCHITECTURES = ("cross_stitch", "mtan", "mmoe", "cgc", "ple", "dselect_k", "task_graph", "per_task_lora_frozen")
STEPS, BATCH = 3, 16


def batches() -> list[dict[str, torch.Tensor]]:
    return [batch(BATCH, seed=s) for s in range(STEPS)]


def run(name: str, data: list, out_dir: str, **trainer_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    module = build(name, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    monitor = NegativeTransferMonitor(interval=1, output_dir=os.path.join(out_dir, name))
    trainer = quiet_trainer(callbacks=[UPGrad(), monitor], max_epochs=1, limit_val_batches=0, **trainer_kwargs)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None, shuffle=False))
    return flat_parameters(module), monitor.cosine_sum.clone()


def rank_main(rank: int, out_dir: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    data = split(batches(), 2, rank)
    results = {name: run(name, data, out_dir, strategy="ddp", devices=2, use_distributed_sampler=False)
               for name in ARCHITECTURES}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    out_dir, port = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    torch.save({name: run(name, batches(), out_dir) for name in ARCHITECTURES}, os.path.join(out_dir, "reference.pt"))
    mp.spawn(rank_main, args=(out_dir, port), nprocs=2, join=True)
