"""DDP worker for the Gramian engine: one optimizer step on 2 gloo processes, each on its half of a batch.

Usage: python ddp_gramian_worker.py OUT_DIR PORT. Writes reference.pt (the starting parameters) and
rank0.pt, rank1.pt: {method: {"parameters": flat parameters after the step, "gramian" and "weights": what the
method's ``step_weights`` got and returned}}. Run by tests/test_gramian_engine.py, which computes the expected step itself.
"""

import os
import sys
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from gradient_helpers import flat_parameters, loader, make_batches, make_module, quiet_trainer, split
from mtl_lightning.gradients import NashMTL, UPGrad

BATCH, LR = 16, 0.1
#: UPGrad's weights do not change when the Gramian is rescaled; Nash-MTL's do (w ∝ 1/√scale): the
#: scale of the global Gramian matters to it.
METHODS: dict[str, Callable[[], Any]] = {
    "UPGrad": lambda: UPGrad(engine="gramian"),
    "NashMTL": lambda: NashMTL(engine="gramian"),
}


def batch() -> dict[str, torch.Tensor]:
    return {k: v.double() if v.is_floating_point() else v for k, v in make_batches(1, BATCH)[0].items()}


def start() -> torch.nn.Module:
    """The module of the step: plain SGD, so that the step is −LR × the written gradient."""
    module = make_module(lr=LR)
    module.optimizer_factory = lambda params: torch.optim.SGD(params, lr=LR)
    return module


def record_weights(method: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(Gramian, weights) of every call of the method's ``step_weights``."""
    calls = []
    original = method.step_weights

    def recording(gramian: torch.Tensor, losses: torch.Tensor, ctx: Any) -> torch.Tensor:
        weights = original(gramian, losses, ctx)
        calls.append((gramian.detach().clone(), weights.detach().clone()))
        return weights

    method.step_weights = recording
    return calls


def rank_main(rank: int, out_dir: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    data = split([batch()], 2, rank)
    results = {}
    for name, factory in METHODS.items():
        module, method = start(), factory()
        seen = record_weights(method)
        quiet_trainer(callbacks=[method], max_steps=1, strategy="ddp", devices=2, use_distributed_sampler=False,
                      precision="64-true", limit_val_batches=0).fit(module, loader(data))
        ((gramian, weights),) = seen
        results[name] = {"parameters": flat_parameters(module), "gramian": gramian, "weights": weights}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    out_dir, port = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    torch.save({"parameters": flat_parameters(start())}, os.path.join(out_dir, "reference.pt"))
    mp.spawn(rank_main, args=(out_dir, port), nprocs=2, join=True)
