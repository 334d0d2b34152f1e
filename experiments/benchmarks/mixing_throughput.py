"""Data-loading throughput of the task-mixing data module against plain DataLoaders over the same data.

For each batch size, "plain" iterates one shuffled ``DataLoader`` per task (each over that task's
training set, the cheapest way to read the same samples); each mixing policy iterates the
``MultiDatasetDataModule``'s training loader for the same number of epochs. Samples/s counts every
sample delivered; the ratio is against "plain" (target ≥ 0.9). The best of ``--repeats`` runs is kept.

    PYTHONPATH=$PWD python experiments/benchmarks/mixing_throughput.py [--epochs 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from mtl_lightning.data import AllTasks, DomainDigitsDataModule, RoundRobin, Temperature, Uniform
from mtl_lightning.data.datamodule import collate_batched

POLICIES = {
    "all (max_size)": lambda: AllTasks("max_size"),
    "uniform": Uniform,
    "temperature τ=2": lambda: Temperature(2.0),
    "round_robin": RoundRobin,
}


def count(batch) -> int:
    if "input" in batch:
        return len(batch["input"])
    return sum(len(b["input"]) for b in batch.values())


def time_plain(datasets, batch_size: int, epochs: int) -> float:
    torch.manual_seed(0)
    loaders = [DataLoader(d, batch_size=batch_size, shuffle=True, collate_fn=collate_batched) for d in datasets]
    samples, start = 0, time.perf_counter()
    for _ in range(epochs):
        for loader in loaders:
            for batch in loader:
                samples += count(batch)
    return samples / (time.perf_counter() - start)


def time_mixing(policy, batch_size: int, epochs: int) -> float:
    dm = DomainDigitsDataModule(policy=policy(), batch_size=batch_size)
    loader = dm.train_dataloader()
    samples, start = 0, time.perf_counter()
    for epoch in range(epochs):
        dm.sampler.set_epoch(epoch)
        for batch in loader:
            samples += count(batch)
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    args = parser.parse_args()
    torch.set_num_threads(1)
    dm = DomainDigitsDataModule()
    dm.setup()
    datasets = [splits["train"] for splits in dm.datasets.values()]
    sizes = {t: len(s["train"]) for t, s in dm.datasets.items()}
    print(f"DomainDigits train sizes {sizes}; {args.epochs} epochs per run, best of {args.repeats} runs\n")
    print(f"| {'loader':<18} | batch | samples/s | vs plain |")
    print(f"|{'-' * 20}|------:|----------:|---------:|")
    for batch_size in args.batch_sizes:
        best = {name: 0.0 for name in ["plain DataLoader", *POLICIES]}
        for _ in range(args.repeats):  # interleaved, so load changes on the machine hit every loader alike
            best["plain DataLoader"] = max(best["plain DataLoader"], time_plain(datasets, batch_size, args.epochs))
            for name, policy in POLICIES.items():
                best[name] = max(best[name], time_mixing(policy, batch_size, args.epochs))
        for name, rate in best.items():
            print(f"| {name:<18} | {batch_size:>5} | {rate:>9,.0f} | {rate / best['plain DataLoader']:>7.2f}× |")


if __name__ == "__main__":
    main()
