"""Per-step cost of the two-objective toy under each runner (prints a Markdown table).

    python experiments/toy/benchmark_runners.py --steps 500

``lightning`` is ``Trainer.fit(barebones=True)``; ``direct`` drives the same module and callback in a
plain loop. Both produce identical trajectories (tests/test_toy_two_objective.py checks it).
"""

from __future__ import annotations

import argparse
import time

import torch

from mtl_lightning.toy.two_objective import run_method


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--methods", default="ew,uw,dwa,famo")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| method | direct ms/step | lightning ms/step | 35k steps × 5 starts, direct | same, lightning |")
    print("|---|---|---|---|---|")
    for method in args.methods.split(","):
        cost = {}
        for runner in ("direct", "lightning"):
            run_method(method, (9.0, 9.0), 20, runner=runner)  # warm-up
            start = time.perf_counter()
            run_method(method, (9.0, 9.0), args.steps, runner=runner)
            cost[runner] = (time.perf_counter() - start) / args.steps * 1e3
        total = {r: c * 35000 * 5 / 60e3 for r, c in cost.items()}
        print(f"| {method} | {cost['direct']:.2f} | {cost['lightning']:.2f} | {total['direct']:.1f} min | {total['lightning']:.1f} min |")


if __name__ == "__main__":
    main()
