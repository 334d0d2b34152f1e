"""CelebA (Liu et al., ICCV 2015): 202,599 aligned face images, each with 40 binary attributes,
in torchvision's folder layout (the files of the official release, unchanged)::

    <root>/img_align_celeba/000001.jpg …    the aligned and cropped 178×218 images
    <root>/list_attr_celeba.txt              line 1: the image count; line 2: the 40 attribute names;
                                             then "<file>  ±1 × 40" per image (1 = has the attribute)
    <root>/list_eval_partition.txt           "<file> 0|1|2": train (162,770), val (19,867), test (19,962)

Nothing is downloaded: get the files from the CelebA site (mmlab.ie.cuhk.edu.hk/projects/CelebA.html)
and give their folder as ``root``.

**Tasks.** Each attribute is its own binary classification task, as Sener & Koltun (NeurIPS 2018,
"Multi-Task Learning as Multi-Objective Optimization") set it up: 40 tasks, one two-class head each;
their code (github.com/isl-org/MultiObjectiveOptimization, ``multi_task/loaders/celeba_loader.py``)
reads the official partition and resizes the images to 64×64. The label key of an attribute is its
name (``Smiling``), the label 1 where the file says 1 and 0 where it says −1. ``attributes`` picks a
subset. Every batch carries every chosen attribute (one shared input, ``tasks_per_step = "all"``).

**Preprocessing.** Each image is resized to ``image_size`` (default 64×64, as Sener & Koltun; the
aspect ratio is not kept, as in their loader), scaled to [0, 1] and normalised with ``mean`` / ``std``
(default: ImageNet's, for an ImageNet-initialised encoder; Sener & Koltun subtract a per-channel mean
only). Optional training augmentation: a horizontal flip with probability ½, seeded by (``seed``,
epoch, image), so it is the same in any worker and after a resume (off by default: their loader has
none).
"""

from __future__ import annotations

import os
from array import array
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mtl_lightning.data.datamodule import MultiTaskDataModule
from mtl_lightning.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageFilesDataset, Size, as_size

#: The 40 attributes of the official ``list_attr_celeba.txt``, in its order.
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips", "Big_Nose",
    "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses",
    "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes",
    "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling",
    "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
    "Wearing_Necktie", "Young",
)
#: Split codes of ``list_eval_partition.txt``.
CELEBA_SPLITS = {"train": 0, "val": 1, "test": 2}

_SIGNS = {"1": 1, "-1": -1}
IMAGES, ATTRIBUTES, PARTITION = "img_align_celeba", "list_attr_celeba.txt", "list_eval_partition.txt"
LAYOUT = (f"<root>/{IMAGES}/<file>.jpg, <root>/{ATTRIBUTES} (count, 40 names, then '<file> ±1 …' per image) and "
          f"<root>/{PARTITION} ('<file> 0|1|2'), torchvision's CelebA layout")


def read_attribute_file(path: str) -> tuple[list[str], list[str], np.ndarray]:
    """``(attribute names, file names, values)`` of a ``list_attr_celeba.txt``; values are ±1 int8
    of shape (images, attributes). Raises naming the file and line at fault."""
    files: list[str] = []
    flat = array("b")  # 8 M values for the full file: one byte each, not a Python list of strings
    with open(path, encoding="utf-8") as f:
        header = [f.readline().split(), f.readline().split()]
        if len(header[0]) != 1 or not header[0][0].isdigit() or not header[1]:
            raise ValueError(f"{path}: line 1 must be the number of images and line 2 the attribute names.")
        count, names = int(header[0][0]), header[1]
        for number, line in enumerate(f, start=3):
            row = line.split()
            if not row:
                continue
            if len(row) != len(names) + 1:
                raise ValueError(f"{path}, line {number}: expected a file name and {len(names)} values (±1), "
                                 f"got {len(row) - 1}.")
            bad = next((i for i, v in enumerate(row[1:]) if v not in _SIGNS), None)
            if bad is not None:
                raise ValueError(f"{path}, line {number}: attribute '{names[bad]}' is {row[bad + 1]}; values must be 1 or -1.")
            files.append(row[0])
            flat.extend(_SIGNS[v] for v in row[1:])
    if len(files) != count:
        raise ValueError(f"{path}: line 1 says {count} images but {len(files)} rows follow.")
    return names, files, np.frombuffer(flat, dtype=np.int8).reshape(len(files), len(names))


def read_partition_file(path: str) -> dict[str, int]:
    """``{file name: 0 | 1 | 2}`` of a ``list_eval_partition.txt``."""
    out: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise ValueError(f"{path}, line {number}: expected '<file> 0|1|2' (train/val/test), got {line.strip()!r}.")
            out[parts[0]] = int(parts[1])
    return out


class CelebADataModule(MultiTaskDataModule):
    """CelebA's attributes as binary classification tasks on the official partition (see the module
    docstring for the layout and the protocol).

    Args:
        root: The folder holding ``img_align_celeba/``, ``list_attr_celeba.txt`` and
            ``list_eval_partition.txt``.
        attributes: The attributes to serve (label keys); default all 40.
        image_size: Height = width, or ``[height, width]``, the images are resized to (default 64).
        augmentation: Random horizontal flip of the training images, seeded per (epoch, image).
        mean, std: Per-channel normalisation (default ImageNet's).
        batch_size, eval_batch_size, num_workers, seed: as for every data module.
    """

    def __init__(self, root: str, attributes: Optional[Sequence[str]] = None, image_size: Size = 64,
                 augmentation: bool = False, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 batch_size: int = 256, eval_batch_size: Optional[int] = None, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed)
        self.root = os.path.expanduser(root)
        self.attributes = list(attributes) if attributes is not None else None
        if self.attributes is not None and (not self.attributes or len(set(self.attributes)) != len(self.attributes)):
            raise ValueError(f"CelebADataModule: attributes must be a non-empty list without repeats, got {attributes}.")
        self.image_size = as_size(image_size, "CelebADataModule")
        self.augmentation = augmentation
        self.mean, self.std = tuple(mean), tuple(std)

    def build_datasets(self) -> dict[str, Dataset]:
        paths = {"folder": os.path.join(self.root, IMAGES), "attributes": os.path.join(self.root, ATTRIBUTES),
                 "partition": os.path.join(self.root, PARTITION)}
        missing = [p for key, p in paths.items() if not (os.path.isdir(p) if key == "folder" else os.path.isfile(p))]
        if missing:
            raise FileNotFoundError(f"CelebADataModule: {', '.join(missing)} not found. Expected {LAYOUT}; get the files "
                                    "from the CelebA site (mmlab.ie.cuhk.edu.hk/projects/CelebA.html). Nothing is downloaded.")
        names, files, values = read_attribute_file(paths["attributes"])
        chosen = self.attributes if self.attributes is not None else names
        unknown = [a for a in chosen if a not in names]
        if unknown:
            raise ValueError(f"CelebADataModule: attribute(s) {unknown} are not in {paths['attributes']}; it has {names}.")
        partition = read_partition_file(paths["partition"])
        unsplit = [f for f in files if f not in partition]
        if unsplit:
            raise ValueError(f"{paths['partition']}: {len(unsplit)} image(s) of {ATTRIBUTES} have no split, e.g. {unsplit[:3]}.")
        present = set(os.listdir(paths["folder"]))
        absent = [f for f in files if f not in present]
        if absent:
            raise FileNotFoundError(f"{paths['folder']}: {len(absent)} image(s) listed in {ATTRIBUTES} are missing, "
                                    f"e.g. {absent[:3]}. Expected {LAYOUT}.")
        split_of = np.array([partition[f] for f in files])
        columns = [names.index(a) for a in chosen]
        labels = torch.from_numpy((values[:, columns].astype(np.int64) + 1) // 2)
        datasets: dict[str, Dataset] = {}
        for split, code in CELEBA_SPLITS.items():
            rows = np.flatnonzero(split_of == code)
            if len(rows) == 0:
                raise ValueError(f"{paths['partition']}: no image is in the {split} split (code {code}).")
            datasets[split] = ImageFilesDataset(
                [os.path.join(paths["folder"], files[r]) for r in rows],
                {a: labels[torch.from_numpy(rows), j] for j, a in enumerate(chosen)},
                self.image_size, self.mean, self.std, flip=self.augmentation and split == "train", seed=self.seed,
            )
        return datasets


__all__ = ["CelebADataModule", "CELEBA_ATTRIBUTES", "CELEBA_SPLITS", "read_attribute_file", "read_partition_file"]
