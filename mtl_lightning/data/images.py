"""Image files as tensors: read with Pillow, resized, scaled to [0, 1] and normalised, as
torchvision's ``Resize((h, w))``, ``ToTensor()`` and ``Normalize(mean, std)`` do on a PIL image
(Pillow's bilinear resize, which antialiases when it shrinks). Shared by the CelebA and Office data
modules; Pillow is the only extra dependency (``pip install mtl-lightning[vision]``)."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

#: ImageNet channel statistics (torchvision's pretrained models expect them).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: File endings read as images (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")

Size = Union[int, Sequence[int]]


def as_size(size: Size, where: str) -> tuple[int, int]:
    """``(height, width)`` from an int (square) or a pair; raise naming ``where`` otherwise."""
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(f"{where}: image_size must be a positive int or [height, width], got {size!r}.")
    height, width = pair
    return int(height), int(width)


def load_image(path: str, size: tuple[int, int], mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """The RGB image at ``path`` as a ``(3, height, width)`` float tensor, normalised."""
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - Pillow is installed with the vision extra
        raise ImportError("Reading image files needs Pillow: pip install 'mtl-lightning[vision]'.") from err
    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean_t) / std_t


class ImageFilesDataset(Dataset):
    """Image files with in-memory labels: sample ``i`` is ``{"input": image, key: labels[key][i], …}``.

    With ``flip`` it is indexed by ``(epoch, index)`` (see
    :class:`~mtl_lightning.data.datamodule.EpochShuffleSampler`) and mirrors the image left-right
    with probability ½, drawn from (seed, epoch, index); a plain index (evaluation) never flips.

    Args:
        paths: One image file per sample.
        labels: ``{label key: tensor}``, each as long as ``paths``.
        image_size: ``(height, width)`` every image is resized to.
        mean, std: Per-channel normalisation.
        flip: Random horizontal flip.
        seed: Seed of the flips.
    """

    def __init__(self, paths: Sequence[str], labels: Mapping[str, Tensor], image_size: tuple[int, int],
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, flip: bool = False,
                 seed: int = 0) -> None:
        wrong = {k: len(v) for k, v in labels.items() if len(v) != len(paths)}
        if wrong:
            raise ValueError(f"ImageFilesDataset: {len(paths)} images but label lengths {wrong}.")
        self.paths = list(paths)
        self.labels = dict(labels)
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.flip = flip
        self.epoch_keyed = flip
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> dict[str, Tensor]:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        image = load_image(self.paths[index], self.image_size, self.mean, self.std)
        if self.flip and epoch is not None:
            state = np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]
            if float(torch.rand((), generator=torch.Generator().manual_seed(int(state)))) < 0.5:
                image = image.flip(-1)
        return {"input": image, **{k: v[index] for k, v in self.labels.items()}}

    @property
    def keys(self) -> set[str]:
        return {"input", *self.labels}

    def label_tensor(self, key: str) -> Optional[Tensor]:
        """Every label ``key`` at once (the set-up checks read it without opening an image)."""
        return self.labels.get(key)


__all__ = ["ImageFilesDataset", "load_image", "as_size", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS"]
