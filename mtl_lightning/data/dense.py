"""NYUv2 and Cityscapes in the preprocessed ``.npy`` layout of the MTAN release (Liu et al., CVPR 2019),
which CAGrad, Nash-MTL and FAMO reuse.

The layout (one file per image, numbered from 0 without gaps)::

    <root>/train/image/0.npy   (H, W, 3) float    RGB, scaled to [0, 1]
    <root>/train/label/0.npy   (H, W)    float    class index, -1 = unlabelled      (NYUv2: 13 classes)
    <root>/train/depth/0.npy   (H, W, 1) float    depth, 0 = no depth
    <root>/train/normal/0.npy  (H, W, 3) float    unit surface normal, 0 = none     (NYUv2 only)
    <root>/val/...             the same for the test images

NYUv2: 795 training and 654 test images of 288×384; Cityscapes: 2,975 and 500 images of 128×256
with the 7-class labels in ``label_7/`` (``label_19/`` for 19 classes). Neither is downloaded here:
the MTAN repository (github.com/lorenmt/mtan) links both archives; unpack them and give the folder
as ``root``.

**Protocol** (``experiments/nyuv2/`` of github.com/AvivNavon/nash-mtl): the "val" images are the
test set and there is no separate validation set, so this module's ``val`` and ``test`` splits are
both the test images; training applies MTAN's random scale-crop (scale 1.0, 1.2 or 1.5, crop
resized back, depth divided by the scale) and a horizontal flip with probability ½ (the normal's x
component negated). Every draw is seeded by (``seed``, epoch, image), so it does not depend on the
global RNG, the number of workers or a resume.
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from mtl_lightning.data.datamodule import MultiTaskDataModule

#: Kinds of task map, named by their folder's prefix (``label_7`` holds labels): how each is read and augmented.
TASK_KINDS = ("label", "depth", "normal")

_NPY = re.compile(r"^(\d+)\.npy$")


def random_scale_crop(sample: dict[str, Tensor], kinds: Mapping[str, str], generator: torch.Generator,
                      scales: Sequence[float] = (1.0, 1.2, 1.5)) -> dict[str, Tensor]:
    """MTAN's ``RandomScaleCrop``: crop a random 1/scale window and resize it back (bilinear for
    images and normals, nearest for labels and depth; depth divided by the scale)."""
    height, width = next(iter(sample.values())).shape[-2:]
    scale = scales[int(torch.randint(len(scales), (1,), generator=generator))]
    h, w = int(height / scale), int(width / scale)
    i = int(torch.randint(height - h + 1, (1,), generator=generator))
    j = int(torch.randint(width - w + 1, (1,), generator=generator))
    out = {}
    for key, value in sample.items():
        crop = value[..., i:i + h, j:j + w]
        batch = crop[None] if crop.dim() == 3 else crop[None, None]
        if kinds[key] in ("image", "normal"):
            resized = F.interpolate(batch, size=(height, width), mode="bilinear", align_corners=True)
        else:
            resized = F.interpolate(batch.float(), size=(height, width), mode="nearest")
        resized = resized[0] if value.dim() == 3 else resized[0, 0]
        out[key] = resized / scale if kinds[key] == "depth" else resized.to(value.dtype)
    return out


def horizontal_flip(sample: dict[str, Tensor], kinds: Mapping[str, str]) -> dict[str, Tensor]:
    """Mirror every map left-right; a normal's x component changes sign."""
    out = {}
    for key, value in sample.items():
        flipped = value.flip(-1)
        if kinds[key] == "normal":
            flipped = torch.cat([-flipped[:1], flipped[1:]])
        out[key] = flipped
    return out


class DenseNpyDataset(Dataset):
    """One split of a folder-per-map ``.npy`` layout: sample ``i`` is ``{key: map}`` read from
    ``<split_dir>/<folder>/<i>.npy`` for each ``key: folder`` of ``folders``.

    Maps are returned channels-first: the image and normals ``(C, H, W)`` float, the label ``(H, W)``
    long, the depth ``(1, H, W)`` float. With ``augment`` it is indexed by ``(epoch, index)`` (the
    training sampler does so, see :class:`~mtl_lightning.data.datamodule.EpochShuffleSampler`) and
    applies the scale-crop and flip drawn from (seed, epoch, index).

    Args:
        split_dir: The split's folder (``<root>/train``).
        folders: ``{batch key: sub-folder}``, e.g. ``{"input": "image", "segmentation": "label"}``.
        kinds: ``{batch key: "image" | "label" | "depth" | "normal"}``.
        augment: Apply the random scale-crop and flip.
        seed: Seed of the augmentation.
    """

    def __init__(self, split_dir: str, folders: Mapping[str, str], kinds: Mapping[str, str], augment: bool = False,
                 seed: int = 0) -> None:
        self.split_dir = split_dir
        self.folders = dict(folders)
        self.kinds = dict(kinds)
        self.augment = augment
        self.epoch_keyed = augment
        self.seed = seed
        counts = {}
        for key, folder in self.folders.items():
            path = os.path.join(split_dir, folder)
            if not os.path.isdir(path):
                raise FileNotFoundError(f"{split_dir}: no '{folder}/' folder (for '{key}'); expected {folder}/0.npy, "
                                        f"{folder}/1.npy, ... beside {sorted(self.folders.values())}.")
            numbers = sorted(int(m.group(1)) for name in os.listdir(path) if (m := _NPY.match(name)))
            if numbers != list(range(len(numbers))):
                gap = next((i for i, n in enumerate(numbers) if n != i), len(numbers))
                raise ValueError(f"{path}: files must be numbered 0.npy … N-1.npy without gaps; {gap}.npy is missing.")
            counts[folder] = len(numbers)
        if len(set(counts.values())) != 1:
            raise ValueError(f"{split_dir}: the folders hold different numbers of maps: {counts}.")
        self.length = next(iter(counts.values()))
        if self.length == 0:
            raise ValueError(f"{split_dir}: no .npy files in {sorted(counts)}.")
        first = self._load(0)
        sizes = {k: tuple(v.shape[-2:]) for k, v in first.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"{split_dir}: maps of image 0 differ in size: {sizes}.")

    def __len__(self) -> int:
        return self.length

    def _load(self, index: int) -> dict[str, Tensor]:
        sample = {}
        for key, folder in self.folders.items():
            path = os.path.join(self.split_dir, folder, f"{index}.npy")
            array = np.load(path, allow_pickle=False)
            kind = self.kinds[key]
            expected = {"image": 3, "normal": 3, "depth": 1}.get(kind)
            if kind == "label":
                if array.ndim != 2:
                    raise ValueError(f"{path}: a label map must be (H, W), got shape {array.shape}.")
                sample[key] = torch.from_numpy(np.ascontiguousarray(array)).long()
                continue
            if array.ndim == 2 and kind == "depth":
                array = array[..., None]
            if array.ndim != 3 or array.shape[-1] != expected:
                raise ValueError(f"{path}: a {kind} map must be (H, W, {expected}), got shape {array.shape}.")
            sample[key] = torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, 0))).float()
        return sample

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> dict[str, Tensor]:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        sample = self._load(index)
        if self.augment and epoch is not None:
            state = np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(state))
            sample = random_scale_crop(sample, self.kinds, generator)
            if float(torch.rand((), generator=generator)) < 0.5:
                sample = horizontal_flip(sample, self.kinds)
        return sample

    @property
    def keys(self) -> set[str]:
        return set(self.folders)


class DenseNpyDataModule(MultiTaskDataModule):
    """Base data module of the MTAN ``.npy`` layout: ``<root>/train`` for training, ``<root>/val`` for
    both validation and test (the published protocol has no separate validation set).

    Args:
        root: The folder holding ``train/`` and ``val/``.
        tasks: ``{batch key: sub-folder}`` of the task maps to read (the image is always read into
            ``"input"``); defaults to every task of the benchmark.
        augmentation: Random scale-crop and flip on the training images.
        batch_size, eval_batch_size, num_workers, seed: as for every data module.
    """

    #: ``{batch key: sub-folder}`` of the benchmark's tasks.
    task_maps: dict[str, str] = {}
    #: Benchmark name and where its archive is, for error messages.
    benchmark = "dense"
    source = "the MTAN repository (github.com/lorenmt/mtan) links the preprocessed archive"

    def __init__(self, root: str, tasks: Optional[dict[str, str]] = None, augmentation: bool = True,
                 batch_size: int = 2, eval_batch_size: Optional[int] = None, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed)
        self.root = os.path.expanduser(root)
        self.task_folders = dict(tasks) if tasks is not None else dict(self.task_maps)
        self.kinds = {"input": "image"}
        for key, folder in self.task_folders.items():
            kind = folder.split("_")[0]
            if kind not in TASK_KINDS:
                raise ValueError(f"{type(self).__name__}: tasks['{key}'] = '{folder}' is not a task map folder; its name must "
                                 f"start with one of {list(TASK_KINDS)} (e.g. {sorted(self.task_maps.values())}).")
            self.kinds[key] = kind
        self.augmentation = augmentation

    def build_datasets(self) -> dict[str, Dataset]:
        missing = [s for s in ("train", "val") if not os.path.isdir(os.path.join(self.root, s))]
        if missing:
            expected = ", ".join(["image", *self.task_folders.values()])
            raise FileNotFoundError(
                f"{type(self).__name__}: root '{self.root}' has no {' or '.join(f'{m}/' for m in missing)} folder. "
                f"Expected the {self.benchmark} .npy layout: <root>/train/{{{expected}}}/<i>.npy and the same under "
                f"<root>/val/; {self.source}. Nothing is downloaded at run time."
            )
        folders = {"input": "image", **self.task_folders}
        train = DenseNpyDataset(os.path.join(self.root, "train"), folders, self.kinds, self.augmentation, self.seed)
        test = DenseNpyDataset(os.path.join(self.root, "val"), folders, self.kinds, False, self.seed)
        return {"train": train, "val": test, "test": test}


class NYUv2DataModule(DenseNpyDataModule):
    """NYUv2 (Silberman et al., ECCV 2012) at 288×384 as MTAN preprocessed it: 13-class segmentation,
    depth and surface normals; batch keys ``segmentation``, ``depth``, ``normal``."""

    task_maps = {"segmentation": "label", "depth": "depth", "normal": "normal"}
    benchmark = "NYUv2"


class CityscapesDataModule(DenseNpyDataModule):
    """Cityscapes (Cordts et al., CVPR 2016) at 128×256 as MTAN preprocessed it: 7-class segmentation
    (``label_7``; give ``tasks={"segmentation": "label_19", "depth": "depth"}`` for 19 classes) and
    disparity-based depth; batch keys ``segmentation``, ``depth``."""

    task_maps = {"segmentation": "label_7", "depth": "depth"}
    benchmark = "Cityscapes"

    def __init__(self, root: str, tasks: Optional[dict[str, str]] = None, augmentation: bool = True,
                 batch_size: int = 8, eval_batch_size: Optional[int] = None, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(root, tasks, augmentation, batch_size, eval_batch_size, num_workers, seed)


def write_npy_layout(root: str, split: str, maps: Mapping[str, Sequence[np.ndarray]]) -> None:
    """Write ``maps`` (``{folder: [array per image]}``) in the layout above, e.g. to convert another
    copy of the data or to make a test fixture."""
    for folder, arrays in maps.items():
        path = os.path.join(root, split, folder)
        os.makedirs(path, exist_ok=True)
        for i, array in enumerate(arrays):
            np.save(os.path.join(path, f"{i}.npy"), np.asarray(array))


__all__ = ["DenseNpyDataset", "DenseNpyDataModule", "NYUv2DataModule", "CityscapesDataModule",
                      "random_scale_crop", "horizontal_flip", "write_npy_layout"]
