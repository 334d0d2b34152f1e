"""A planted-structure benchmark for negative-transfer monitoring.

Inputs x ~ N(0, I_d). Two groups of regression tasks, ``a`` and ``b``. Each group has one latent
factor, f_g = tanh(z_g M_g), a nonlinear function of z_g = U_g x (a ``latent_dim``-dimensional
projection of x; the two groups' projections are orthogonal, M_g is a random rotation). Every
task of a group reads that same factor through its own random orthonormal readout R_t:
y_t = f_g R_t + noise. So the tasks of a group need exactly the same features (any one of them
determines the others linearly, on every draw), and the two groups need unrelated ones. Give
the encoder ``out_features = latent_dim``: room for one group's factor only, so the groups compete
for the shared features (conflict across groups) while the tasks of a group help each other.

One more task, ``random``, has a fixed random target per sample, independent of x: nothing to
learn, only noise to memorise into the shared features. Its targets are Gaussian with scale
``random_scale`` (regression, ``outputs_per_task`` values per sample), so that its loss, like a
badly scaled auxiliary task's, is large and never falls.

Tasks: ``a1 … a<k>`` (group A), ``b1 … b<k>`` (group B), ``random``; all regression.
"""

from __future__ import annotations

from typing import Optional

import torch

from mtl_lightning.data.datamodule import MultiTaskDataModule, TensorDictDataset


def planted_task_names(tasks_per_group: int = 2, random_task: bool = True) -> list[str]:
    """Names of the planted tasks: group A, group B, then ``random``."""
    names = [f"{g}{i + 1}" for g in ("a", "b") for i in range(tasks_per_group)]
    return names + (["random"] if random_task else [])


class PlantedGroupsDataModule(MultiTaskDataModule):
    """Two planted task groups plus a random-label task (see module docstring).

    Args:
        tasks_per_group: Regression tasks in each of the two groups (≥ 1).
        input_dim: d. latent_dim: Dimension of each group's latent factor (2·latent_dim ≤ d).
        outputs_per_task: Regression outputs of each task.
        random_task: Add the ``random`` label task.
        random_scale: Standard deviation of the random labels.
        noise: Standard deviation of the regression noise.
        num_train / num_val / num_test: samples per split.
    """

    def __init__(
        self,
        tasks_per_group: int = 2,
        input_dim: int = 16,
        latent_dim: int = 4,
        outputs_per_task: int = 4,
        random_task: bool = True,
        random_scale: float = 3.0,
        noise: float = 0.05,
        num_train: int = 2048,
        num_val: int = 512,
        num_test: int = 512,
        batch_size: int = 128,
        eval_batch_size: Optional[int] = 512,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed)
        if tasks_per_group < 1:
            raise ValueError(f"PlantedGroupsDataModule: tasks_per_group must be >= 1, got {tasks_per_group}.")
        if 2 * latent_dim > input_dim:
            raise ValueError(f"PlantedGroupsDataModule: 2 * latent_dim ({2 * latent_dim}) must not exceed input_dim ({input_dim}).")
        self.tasks_per_group = tasks_per_group
        self.input_dim, self.latent_dim, self.outputs_per_task = input_dim, latent_dim, outputs_per_task
        self.random_task, self.random_scale, self.noise = random_task, random_scale, noise
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.task_names = planted_task_names(tasks_per_group, random_task)
        self.groups = {g: [n for n in self.task_names if n.startswith(g) and n != "random"] for g in ("a", "b")}

    def build_datasets(self) -> dict[str, TensorDictDataset]:
        generator = torch.Generator().manual_seed(self.seed)

        def orthonormal(rows: int, cols: int) -> torch.Tensor:
            """A random (rows, cols) matrix with orthonormal columns (or rows, if rows < cols)."""
            q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=generator))
            return q if rows >= cols else q.T

        basis = orthonormal(self.input_dim, 2 * self.latent_dim)
        projections = {"a": basis[:, : self.latent_dim], "b": basis[:, self.latent_dim :]}
        rotations = {g: orthonormal(self.latent_dim, self.latent_dim) for g in self.groups}
        readouts = {name: orthonormal(self.latent_dim, self.outputs_per_task) for names in self.groups.values() for name in names}
        datasets = {}
        for split, n in self.sizes.items():
            x = torch.randn(n, self.input_dim, generator=generator)
            data = {"input": x}
            for group, names in self.groups.items():
                factor = torch.tanh(x @ projections[group] @ rotations[group])
                for name in names:
                    clean = factor @ readouts[name]
                    data[name] = clean + self.noise * torch.randn(clean.shape, generator=generator)
            if self.random_task:
                data["random"] = self.random_scale * torch.randn(n, self.outputs_per_task, generator=generator)
            datasets[split] = TensorDictDataset(data)
        return datasets
