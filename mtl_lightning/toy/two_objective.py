"""The two-objective toy problem of CAGrad (Liu et al., NeurIPS 2021), Nash-MTL (Navon et al., ICML
2022) and FAMO (Liu et al., NeurIPS 2023), as defined in their official code.

Two losses of a point x = (x1, x2) ∈ R² with a Pareto set near x2 ≈ −8.36, x1 ∈ [−7, 7]. Each
balancing method runs from the papers' start points **through its real callback class**: the point
is the shared parameter of a :class:`TwoObjectiveModule` (a ``MultiTaskModule``) and every step is
the framework's own :class:`~mtl_lightning.core.MultiTaskStep` (context, ``method.backward(ctx)``,
optimizer step, ``method.on_optimizer_step(ctx)``). Gradient methods (``needs_all_tasks_per_step``) plug in
unchanged: they see ``ctx.shared_parameters() == [x]`` and run in param mode; GradDrop (rep mode only)
sees the representation z = x as a batch of one sample. :func:`on_pareto_set` checks end points
against the analytic Pareto set (:func:`pareto_front`).

Two runners:

* ``direct`` (default): that step over a plain PyTorch backend, without the Lightning trainer loop (no AMP, no
  DDP, no logging: the toy needs none): about 2.5× less per-step overhead (35k EW steps ≈ 40 s on
  one core; ``experiments/toy/benchmark_runners.py`` prints the table).
* ``lightning``: ``Trainer.fit`` with ``barebones=True``; identical trajectories, for checking.

Command::

    python -m mtl_lightning.toy.two_objective --methods ew,uw,famo --steps 35000 --out toy.png
    python -m mtl_lightning.toy.two_objective --methods cagrad,nash_mtl --starts all --out toy.png
"""

from __future__ import annotations

import argparse
import importlib
import time
from functools import partial
from typing import Any, Iterator, Optional, Sequence, cast

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from mtl_lightning.balancing.base import BalancingMethod
from mtl_lightning.core import MultiTaskStep, TorchBackend
from mtl_lightning.gradients.base import GradientBalancer
from mtl_lightning.models.module import MultiTaskModule
from mtl_lightning.registry import lookup
from mtl_lightning.tasks.task import MetricSpec, Task

#: Start points of the Nash-MTL / FAMO figures.
PAPER_STARTS: tuple[tuple[float, float], ...] = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))
#: Start points of the CAGrad figure.
CAGRAD_STARTS: tuple[tuple[float, float], ...] = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))
#: Scale of each objective (the papers multiply L1 by 0.1 to make the losses imbalanced).
PAPER_SCALES = (0.1, 1.0)
#: A lower bound of both (unscaled) objectives: L ≥ −20 everywhere, so L − (−21) > 0.
LOWER_BOUND = -21.0
#: Toy settings of the papers' code that differ from (or pin) a method's defaults. FAMO's toy run
#: uses no weight decay and L_t* = −21 × the objective's scale. CAGrad's toy (``toy.py`` of the
#: official repo) uses c = 0.5. Nash-MTL's toy (``experiments/toy`` of the official repo) runs the
#: method with its defaults: at most 20 solver iterations, weights updated every step, the shared
#: gradient's norm clipped to 1.
TOY_METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "FAMO": {"gamma": 0.0, "min_losses": {"f1": LOWER_BOUND * PAPER_SCALES[0], "f2": LOWER_BOUND * PAPER_SCALES[1]}},
    "CAGrad": {"c": 0.5},
    "NashMTL": {"max_norm": 1.0, "iterations": 20, "update_every": 1},
}
#: Methods that take the log of each loss (DB-MTL: ∇log L_t) or scale each gradient by its loss (MoCo:
#: ‖ĝ_t‖ = L_t). The toy's losses are negative, so these methods see L_t − L_t* with L_t* = −21 × the
#: objective's scale (the lower bound FAMO's toy uses); the shift changes no gradient, only the log's
#: argument or the norm.
TOY_SHIFTED_LOSSES: tuple[str, ...] = ("DBMTL", "MoCo")
TASKS = ("f1", "f2")


def two_objective_losses(x: Tensor) -> tuple[Tensor, Tensor]:
    """(L1, L2) at points ``x`` of shape (..., 2), unscaled."""
    x1, x2 = x[..., 0], x[..., 1]
    f1 = torch.log(torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), min=5e-6)) + 6
    f2 = torch.log(torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), min=5e-6)) + 6
    c1 = torch.clamp(torch.tanh(x2 / 2), min=0)
    c2 = torch.clamp(torch.tanh(-x2 / 2), min=0)
    f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    return c1 * f1 + c2 * f1_sq, c1 * f2 + c2 * f2_sq


def _front_equation(x1: Tensor, x2: Tensor) -> Tensor:
    c2 = torch.tanh(-x2 / 2)
    dc2 = -0.5 / torch.cosh(x2 / 2) ** 2
    return dc2 * ((49 - x1**2) / 10 + 0.01 * (x2 + 8) ** 2 - 20) + c2 * 0.02 * (x2 + 8)


def pareto_front(x1: Tensor, iterations: int = 60) -> Tensor:
    """x2 of the Pareto set above each x1 ∈ [−7, 7] (float64).

    Below x2 = 0 the losses are L_t = c2(x2)·f_t_sq. Stationarity λ∇L1 + (1−λ)∇L2 = 0 gives
    λ = (x1 + 7)/14 from the x1 components and, from the x2 components,
    c2'(x2)·((49 − x1²)/10 + 0.01(x2 + 8)² − 20) + c2(x2)·0.02(x2 + 8) = 0, whose root in [−10, −6]
    is found by bisection: x2 = −8.355 at x1 = 0 (the papers draw the line x2 = −8.3552), −8.434 at
    x1 = ±7, the minima of the two objectives. Positive scales of the objectives change nothing.
    """
    x1 = torch.as_tensor(x1, dtype=torch.float64)
    lo = torch.full_like(x1, -10.0)
    hi = torch.full_like(x1, -6.0)
    lo_sign = torch.sign(_front_equation(x1, lo))
    for _ in range(iterations):
        mid = (lo + hi) / 2
        same = torch.sign(_front_equation(x1, mid)) == lo_sign
        lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
    return (lo + hi) / 2


def pareto_distance(x: Tensor) -> Tensor:
    """Distance of points ``x`` (..., 2) to the Pareto set: to the nearest x1 ∈ [−7, 7] horizontally and
    to the front's x2 vertically (the front's slope is at most 0.03, so this is the Euclidean
    distance to within 0.05 %)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    x1, x2 = x[..., 0], x[..., 1]
    dx1 = (x1.abs() - 7).clamp_min(0)
    dx2 = x2 - pareto_front(x1.clamp(-7, 7))
    return torch.sqrt(dx1**2 + dx2**2)


def pareto_gap(x: Tensor) -> Tensor:
    """MGDA's Pareto-stationarity measure on unit gradients at points ``x`` (..., 2):
    min_{λ∈[0,1]} ‖λu1 + (1−λ)u2‖ with u_t = ∇L_t/‖∇L_t‖, which is √((1 + cos)/2) for the angle
    between the two gradients: 0 when they are opposite, 1 when they agree. Unit gradients make it
    independent of the objectives' scales."""
    x = torch.as_tensor(x, dtype=torch.float64).detach().clone().requires_grad_(True)
    with torch.enable_grad():
        l1, l2 = two_objective_losses(x)
        (g1,) = torch.autograd.grad(l1.sum(), x, retain_graph=True)
        (g2,) = torch.autograd.grad(l2.sum(), x)
    u1 = g1 / g1.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    u2 = g2 / g2.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    cos = (u1 * u2).sum(-1)
    return ((1 + cos) / 2).clamp_min(0).sqrt()


def on_pareto_set(x: Tensor, tol: float = 0.05, gap_tol: float = 0.05) -> Tensor:
    """Whether points ``x`` (..., 2) are on the Pareto set: within ``tol`` of it (:func:`pareto_distance`)
    and Pareto-stationary to ``gap_tol`` (:func:`pareto_gap`; 0.05 is an angle above 174° between the
    two gradients)."""
    return (pareto_distance(x) <= tol) & (pareto_gap(x) <= gap_tol)


class PointEncoder(nn.Module):
    """The shared parameter: the point x itself (the 'features' every head reads)."""

    out_features = 2

    def __init__(self, start: Sequence[float]) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor([float(v) for v in start]))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.x.expand(len(inputs), 2)


class ToyObjective(Task):
    """One objective of the toy: its loss is ``scale × L_index(x)`` (the head is the identity)."""

    output_size = 2

    def __init__(self, name: str, index: int, scale: float) -> None:
        self.index = index
        self.scale = scale
        super().__init__(name, label_key="input", head=nn.Identity())

    def metric_specs(self) -> dict[str, MetricSpec]:
        return {}

    def valid_mask(self, target: Tensor) -> Tensor:
        return torch.ones(len(target), dtype=torch.bool, device=target.device)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return self.scale * two_objective_losses(output[0])[self.index]


class TwoObjectiveModule(MultiTaskModule):
    """A ``MultiTaskModule`` whose only shared parameter is the point x.

    The shared representation handed to balancing methods is z = x as a batch of one sample, shape
    (1, 2): the encoder is the identity, so gradients w.r.t. z ("rep mode") equal gradients w.r.t. x
    ("param mode").

    Args:
        start: Initial x.
        scales: Factor on each objective (the papers use (0.1, 1.0)).
        lr: Adam learning rate (1e-3 in the papers).
        offsets: Constant added to each (scaled) loss the method sees; changes no gradient (see
            :data:`TOY_SHIFTED_LOSSES`).
    """

    encoder: PointEncoder

    def __init__(self, start: Sequence[float], scales: Sequence[float] = PAPER_SCALES, lr: float = 1e-3,
                 offsets: Sequence[float] = (0.0, 0.0)) -> None:
        tasks = [ToyObjective(name, i, float(s)) for i, (name, s) in enumerate(zip(TASKS, scales))]
        super().__init__(PointEncoder(start), tasks, optimizer=partial(torch.optim.Adam, lr=lr))
        self.offsets = tuple(float(o) for o in offsets)
        self.trajectory: list[Tensor] = []

    def compute_losses(
        self, batch: Any, stage: str = "train", head_inputs: Optional[dict[str, Tensor]] = None
    ) -> tuple[Any, dict[str, Tensor], dict[str, Tensor]]:
        # The generic path (label checks, masks, host syncs) costs more than the toy itself. The toy
        # has no heads, so ``head_inputs`` stays empty.
        z = self.encoder.x.unsqueeze(0)  # the representation: one sample
        l1, l2 = two_objective_losses(z[0])
        scales = [cast(ToyObjective, t).scale for t in self.tasks.values()]
        losses = {"f1": scales[0] * l1, "f2": scales[1] * l2}
        if any(self.offsets):
            losses = {n: l + o for (n, l), o in zip(losses.items(), self.offsets)}
        return z, {n: z for n in TASKS}, losses

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.trajectory.append(self.encoder.x.detach().clone())


class _Steps(IterableDataset):
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for _ in range(self.steps):
            yield {"input": torch.zeros(1, 1)}


def _direct_run(module: TwoObjectiveModule, method: BalancingMethod, steps: int, steps_per_epoch: int) -> None:
    trainer = pl.Trainer(
        callbacks=[method], logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, accelerator="cpu", devices=1,
    )
    module.trainer = trainer
    method.setup(trainer, module, "fit")
    module.setup("fit")
    step = MultiTaskStep(module, TorchBackend(module.configure_optimizers()))  # no AMP, DDP or accumulation
    batch = {"input": torch.zeros(1, 1)}
    for i in range(steps):
        step(batch, method, global_step=i, epoch=i // steps_per_epoch)
        module.trajectory.append(module.encoder.x.detach().clone())


def _lightning_run(module: TwoObjectiveModule, method: BalancingMethod, steps: int, steps_per_epoch: int) -> None:
    trainer = pl.Trainer(
        callbacks=[method], barebones=True, max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    loader = DataLoader(_Steps(steps_per_epoch), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)


def resolve_method(name: str) -> type[BalancingMethod]:
    """A balancing class from a short name (``famo``, ``EW``, ``nash_mtl``…: a method of the registry,
    :func:`mtl_lightning.registry.lookup`) or a dotted path (``my_pkg.methods.MyMethod``)."""
    if "." in name:
        module_name, _, cls_name = name.rpartition(".")
        cls = getattr(importlib.import_module(module_name), cls_name, None)
        if isinstance(cls, type) and issubclass(cls, BalancingMethod):
            return cls
        raise ValueError(f"{name!r} is not a BalancingMethod class.")
    try:
        return lookup(name)
    except ValueError as error:
        raise ValueError(f"{error} (or give a dotted class path)") from None


def build_method(name: str) -> BalancingMethod:
    """A method from a name (:func:`resolve_method`) with the toy settings: the options of
    :data:`TOY_METHOD_OPTIONS`, and ``mode="param"`` for gradient methods that support it (the toy has
    no encoder; GradDrop, rep mode only, runs on z = x)."""
    cls = resolve_method(name)
    options = dict(TOY_METHOD_OPTIONS.get(cls.__name__, {}))
    if issubclass(cls, GradientBalancer) and "param" in cls.supported_modes:
        options.setdefault("mode", "param")
    return cls(**options)


def run_method(
    method: str | BalancingMethod,
    start: Sequence[float],
    steps: int,
    lr: float = 1e-3,
    scales: Sequence[float] = PAPER_SCALES,
    runner: str = "direct",
    steps_per_epoch: int = 100,
) -> Tensor:
    """Trajectory (steps+1, 2) of x from ``start`` under one balancing method.

    ``method`` is an instance or a name for :func:`build_method` (built with the toy settings of
    :data:`TOY_METHOD_OPTIONS`). Methods of :data:`TOY_SHIFTED_LOSSES` see the losses shifted by
    −L_t*. ``steps_per_epoch`` sets what an "epoch" is for DWA and STCH.
    """
    if isinstance(method, str):
        method = build_method(method)
    shifted = type(method).__name__ in TOY_SHIFTED_LOSSES
    offsets = [-LOWER_BOUND * s if shifted else 0.0 for s in scales]
    module = TwoObjectiveModule(start, scales, lr, offsets)
    module.trajectory.append(module.encoder.x.detach().clone())
    if runner == "direct":
        _direct_run(module, method, steps, steps_per_epoch)
    elif runner == "lightning":
        _lightning_run(module, method, steps, steps_per_epoch)
    else:
        raise ValueError(f"runner must be 'direct' or 'lightning', got {runner!r}.")
    return torch.stack(module.trajectory)


def plot_trajectories(trajectories: dict[str, list[Tensor]], out: str, scales: Sequence[float] = PAPER_SCALES,
                      columns: int = 4, dpi: int = 110, max_points: int = 2000) -> None:
    """One panel per method (``columns`` panels a row): trajectories over contours of the summed (scaled)
    losses, the Pareto set (:func:`pareto_front`), start points (dots) and end points (stars: orange
    on the Pareto set, blue elsewhere, per :func:`on_pareto_set`); saves ``out``. Each trajectory is
    drawn through at most ``max_points`` of its points (its last one included)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # optional dependency
        raise ImportError("Plotting the toy needs matplotlib: pip install 'mtl-lightning[plots]'.") from err
    grid = torch.stack(torch.meshgrid(torch.linspace(-10, 10, 300), torch.linspace(-10, 10, 300), indexing="xy"), -1)
    l1, l2 = two_objective_losses(grid)
    total = scales[0] * l1 + scales[1] * l2
    front_x1 = torch.linspace(-7, 7, 141, dtype=torch.float64)
    front_x2 = pareto_front(front_x1)
    columns = max(1, min(columns, len(trajectories)))
    rows = -(-len(trajectories) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(trajectories):]:
        ax.axis("off")
    for ax, (name, runs) in zip(axes.flat, trajectories.items()):
        ax.contourf(grid[..., 0], grid[..., 1], total, levels=30, cmap="Greys", alpha=0.6)
        ax.plot(front_x1, front_x2, color="tab:red", lw=3, alpha=0.6, label="Pareto set")
        ends = torch.stack([run[-1] for run in runs])
        reached = on_pareto_set(ends)
        for run in runs:
            stride = max(1, -(-len(run) // max_points))
            shown = torch.cat([run[::stride], run[-1:]])
            ax.plot(shown[:, 0], shown[:, 1], lw=1.5)
            ax.scatter(run[0, 0], run[0, 1], marker="o", color="k", s=15, zorder=3)
        ax.scatter(ends[:, 0], ends[:, 1], marker="*", s=70, zorder=4, edgecolors="k", linewidths=0.4,
                   c=["tab:orange" if r else "tab:blue" for r in reached.tolist()])
        ax.set_title(f"{name}: {int(reached.sum())}/{len(runs)} on the Pareto set", fontsize=10)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
        ax.set_aspect("equal")
    for ax in axes[-1]:
        ax.set_xlabel("x1")
    for ax in axes[:, 0]:
        ax.set_ylabel("x2")
    axes[0][0].legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    _compact_png(out)


def _compact_png(path: str) -> None:
    """Re-encode an opaque PNG as RGB with PIL's optimiser: lossless, about 12 % smaller."""
    if not str(path).lower().endswith(".png"):
        return
    try:
        from PIL import Image
    except ImportError:  # matplotlib depends on pillow; nothing to do without it
        return
    with Image.open(path) as opened:
        opened.load()
        image: Image.Image = opened
        if image.mode == "RGBA" and image.getchannel("A").getextrema() == (255, 255):
            image = image.convert("RGB")
        image.save(path, optimize=True)


def reach_table(trajectories: dict[str, list[Tensor]], starts: Sequence[Sequence[float]]) -> str:
    """Markdown table: for each method and start, whether the end point is on the Pareto set
    (:func:`on_pareto_set`) and its distance to it."""
    head = "| method | " + " | ".join(f"({s[0]:g}, {s[1]:g})" for s in starts) + " |"
    lines = [head, "|---" * (len(starts) + 1) + "|"]
    for name, runs in trajectories.items():
        ends = torch.stack([run[-1] for run in runs])
        cells = [f"{'✓' if ok else '✗'} {d:.2f}" for ok, d in zip(on_pareto_set(ends).tolist(), pareto_distance(ends).tolist())]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


STARTS = {"nash-famo": PAPER_STARTS, "cagrad": CAGRAD_STARTS, "all": tuple(dict.fromkeys(PAPER_STARTS + CAGRAD_STARTS))}


def main(argv: Optional[list[str]] = None) -> dict[str, list[Tensor]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="ew,uw,famo", help="comma-separated names or dotted class paths")
    parser.add_argument("--steps", type=int, default=35000, help="optimizer steps per start (papers: 35k-50k, CAGrad 100k)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate on x (papers: 1e-3)")
    parser.add_argument("--starts", choices=sorted(STARTS), default="nash-famo",
                        help="the Nash-MTL / FAMO starts, CAGrad's, or both")
    parser.add_argument("--scales", default=",".join(f"{v:g}" for v in PAPER_SCALES),
                        help="factor on each objective (Nash-MTL / FAMO: 0.1,1; CAGrad: 1,1)")
    parser.add_argument("--runner", choices=["direct", "lightning"], default="direct")
    parser.add_argument("--steps-per-epoch", type=int, default=100, help="what an epoch is for DWA / STCH")
    parser.add_argument("--columns", type=int, default=4, help="panels per row of the figure")
    parser.add_argument("--dpi", type=int, default=110)
    parser.add_argument("--out", default="toy.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a 2-parameter problem: threads only add overhead
    starts = STARTS[args.starts]
    scales = tuple(float(v) for v in args.scales.split(","))
    if len(scales) != 2:
        parser.error(f"--scales needs two values, got {args.scales!r}")
    trajectories: dict[str, list[Tensor]] = {}
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        t0 = time.perf_counter()
        runs = [run_method(name, s, args.steps, args.lr, scales=scales, runner=args.runner,
                           steps_per_epoch=args.steps_per_epoch) for s in starts]
        seconds = time.perf_counter() - t0
        trajectories[resolve_method(name).__name__] = runs
        ends = ", ".join(f"({r[-1, 0]:.2f}, {r[-1, 1]:.2f})" for r in runs)
        print(f"{resolve_method(name).__name__:>10}: {seconds:6.1f} s ({seconds / (len(starts) * args.steps) * 1e3:.3f} ms/step); ends {ends}", flush=True)
    print(reach_table(trajectories, starts))
    plot_trajectories(trajectories, args.out, scales, columns=args.columns, dpi=args.dpi)
    print(f"saved {args.out}")
    return trajectories


if __name__ == "__main__":
    main()
