"""DDP + accumulation worker for CRMOGM and ExcessMTL: 1 process vs 2 gloo processes, 2 micro-batches a step.

Usage: python ddp_stateful_weighting_worker.py OUT_DIR PORT, with METHOD_GROUP=cr_mogm or excess_mtl in
the environment. Each step's batch of 16 is split in two halves (the ranks), each half in two
micro-batches of 4. The reference is one process with accumulate_grad_batches=2 whose micro-batch m is
the union of the ranks' micro-batches m: the update the ranks compute together (in rep mode too, where
each micro-batch is aggregated with the global Gramian of its own). Writes reference.pt, rank0.pt and
rank1.pt: {config: {"parameters": flat parameters, "state": the method's state_dict}}.
"""

import os
import sys
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from gradient_helpers import flat_parameters, loader, make_batches, make_module, quiet_trainer, split
from mtl_lightning.gradients import CRMOGM, MGDA, ExcessMTL, PCGrad, UPGrad

STEPS, BATCH = 4, 16

GROUPS: dict[str, dict[str, Callable[[], Any]]] = {
    "cr_mogm": {
        "CRMOGM-PCGrad": lambda: CRMOGM(PCGrad(seed=1), alpha=0.5),
        "CRMOGM-UPGrad-lr": lambda: CRMOGM(UPGrad(), alpha=0.2, schedule="lr"),
        "CRMOGM-MGDA-UB": lambda: CRMOGM(MGDA(mode="rep"), alpha=0.5),
    },
    "excess_mtl": {
        "ExcessMTL": lambda: ExcessMTL(robust_step_size=1.0),
        "ExcessMTL-warmup": lambda: ExcessMTL(robust_step_size=0.5, warmup_steps=2),
    },
}


def micro_batches(batches: list[dict[str, torch.Tensor]], rank: int) -> list[dict[str, torch.Tensor]]:
    """The two micro-batches of every step of one rank (its half of each batch, halved)."""
    half = split(batches, 2, rank)
    return [mb for b in half for mb in (split([b], 2, 0)[0], split([b], 2, 1)[0])]


def union_micro_batches(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Micro-batch m of every step: rank 0's micro-batch m followed by rank 1's."""
    ranks = [micro_batches(batches, r) for r in range(2)]
    return [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(*ranks)]


def train(method: Any, batches: list[dict[str, torch.Tensor]], **trainer_kwargs: Any) -> dict[str, Any]:
    module = make_module(accumulate=2)
    # A learning rate halved every step (CRMOGM's schedule="lr" follows it).
    module.lr_scheduler_factory = lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    module.lr_scheduler_interval = "step"
    quiet_trainer(callbacks=[method], max_epochs=1, **trainer_kwargs).fit(module, loader(batches))
    return {"parameters": flat_parameters(module), "state": method.state_dict()}


def run(group: str, batches: list[dict[str, torch.Tensor]], **trainer_kwargs: Any) -> dict[str, Any]:
    return {name: train(factory(), batches, **trainer_kwargs) for name, factory in GROUPS[group].items()}


def rank_main(rank: int, out_dir: str, port: str, group: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    batches = micro_batches(make_batches(STEPS, BATCH), rank)
    results = run(group, batches, strategy="ddp", devices=2, use_distributed_sampler=False)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    out_dir, port = sys.argv[1], sys.argv[2]
    group = os.environ["METHOD_GROUP"]
    torch.set_num_threads(1)
    torch.save(run(group, union_micro_batches(make_batches(STEPS, BATCH))), os.path.join(out_dir, "reference.pt"))
    mp.spawn(rank_main, args=(out_dir, port, group), nprocs=2, join=True)
