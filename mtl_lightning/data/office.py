"""Office-31 (Saenko et al., ECCV 2010) and Office-Home (Venkateswara et al., CVPR 2017): object
classification in several image domains, one task (and one dataset) per domain, as LibMTL
(github.com/median-research-group/LibMTL, ``examples/office``) runs them.

The layout: one folder per domain, one sub-folder per class, the images inside::

    <root>/<domain>/<class>/<image>.jpg

* Office-31: domains ``amazon``, ``dslr``, ``webcam`` (2,817 / 498 / 795 images), 31 classes. The
  original archive's extra level (``amazon/images/<class>/``) is accepted as well.
* Office-Home: domains ``Art``, ``Clipart``, ``Product``, ``Real_World`` (2,427 / 4,365 / 4,439 /
  4,357 images), 65 classes. The archive spells the last folder ``Real World``; either spelling is
  found, the task is named ``Real_World`` (LibMTL's name).

Nothing is downloaded: get the archives from the datasets' pages (LibMTL's
``examples/office/README.md`` links both) and give the folder holding the domain folders as ``root``.

**Protocol.** Each domain is a :class:`~mtl_lightning.tasks.ClassificationTask` over the same classes,
label key = the domain's name. LibMTL splits every domain 60/20/20 into train/val/test with fixed
file lists that it ships rather than generates
(``examples/office/data_txt/<dataset>/<domain>_{train,val,test}.txt``, one ``<path relative to the
root> <label>`` line per image, e.g. ``dslr/images/back_pack/frame_0008.jpg 0``; its labels are not
in sorted class order). Two ways to split:

* ``split_lists``: the folder holding those ``.txt`` files (copy ``data_txt/office-31`` or
  ``data_txt/office-home`` from the LibMTL repository). Images, splits and labels are then exactly
  LibMTL's.
* otherwise a seeded split with the same proportions: within each (domain, class), the sorted files
  are shuffled by a generator seeded from (``split_seed``, domain, class) and cut at 60 % and 80 %.
  It is deterministic, stratified by class and independent of the other domains, of the training
  seed and of the machine, but not LibMTL's images. The classes are then the sorted sub-folder names
  (torchvision ``ImageFolder``'s order; hidden ``.*`` entries are skipped), each domain must have
  the same ones, and a label is its class's index.

Images are resized to ``image_size`` (default 224×224), scaled to [0, 1] and normalised with
ImageNet's statistics, with no augmentation (LibMTL's ``office_Dataset`` transform). Training is
LibMTL's multi-input mode: one batch of every domain at every step, the smaller domains cycling
(``policy: all``, :class:`~mtl_lightning.data.AllTasks`).
"""

from __future__ import annotations

import os
import zlib
from typing import Optional, Sequence, Union

import numpy as np
import torch

from mtl_lightning.data.images import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, ImageFilesDataset, Size, as_size
from mtl_lightning.data.mixing import MultiDatasetDataModule
from mtl_lightning.data.policies import MixingPolicy

#: The domains of each benchmark, as LibMTL names them.
OFFICE31_DOMAINS = ("amazon", "dslr", "webcam")
OFFICE_HOME_DOMAINS = ("Art", "Clipart", "Product", "Real_World")


def split_counts(n: int, fractions: tuple[float, float]) -> tuple[int, int]:
    """Train and val counts of ``n`` files (rounded; test gets the rest)."""
    n_train = int(round(fractions[0] * n))
    n_val = min(int(round(fractions[1] * n)), n - n_train)
    return n_train, n_val


def seeded_split(files: Sequence[str], fractions: tuple[float, float], seed: int, *names: str) -> dict[str, list[str]]:
    """Shuffle ``files`` (sorted first) with a generator seeded from ``seed`` and ``names`` (crc32 of
    each), and cut them into ``{"train", "val", "test"}`` by ``fractions`` (train, val)."""
    ordered = sorted(files)
    entropy = [seed, *(zlib.crc32(name.encode("utf-8")) for name in names)]
    order = np.random.default_rng(np.random.SeedSequence(entropy)).permutation(len(ordered))
    shuffled = [ordered[i] for i in order]
    n_train, n_val = split_counts(len(ordered), fractions)
    return {"train": shuffled[:n_train], "val": shuffled[n_train:n_train + n_val], "test": shuffled[n_train + n_val:]}


class OfficeDataModule(MultiDatasetDataModule):
    """Base data module of the Office benchmarks: one :class:`ImageFilesDataset` per domain and split
    (see the module docstring for the layout, the split and the protocol).

    Args:
        root: The folder holding one folder per domain.
        domains: The domains (tasks) to serve; default all of the benchmark's.
        image_size: Height = width, or ``[height, width]``, of the resized images (default 224).
        split_fractions: Fractions of each (domain, class) for train and val; the rest is test.
        split_seed: Seed of the split (kept apart from ``seed``, the training order, so that runs
            with different seeds share one split, as LibMTL's fixed lists do).
        split_lists: A folder with LibMTL's ``<domain>_{train,val,test}.txt`` lists: use their split
            and labels instead of the seeded split (``split_fractions`` and ``split_seed`` are then unused).
        policy, steps_per_epoch, batch_size, eval_batch_size, num_workers, seed: see
            :class:`~mtl_lightning.data.mixing.MultiDatasetDataModule` (``batch_size`` is per domain).
    """

    #: The benchmark's domains, its name and where its archive is, for error messages.
    all_domains: tuple[str, ...] = ()
    benchmark = "Office"
    source = "the dataset's site"

    def __init__(self, root: str, domains: Optional[Sequence[str]] = None, image_size: Size = 224,
                 split_fractions: tuple[float, float] = (0.6, 0.2), split_seed: int = 0, split_lists: Optional[str] = None,
                 policy: Union[str, MixingPolicy] = "all", steps_per_epoch: Optional[int] = None, batch_size: int = 64,
                 eval_batch_size: Optional[int] = None, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(policy, None, steps_per_epoch, batch_size, eval_batch_size, num_workers, seed)
        name = type(self).__name__
        self.root = os.path.expanduser(root)
        self.domains = list(domains) if domains is not None else list(self.all_domains)
        unknown = [d for d in self.domains if d not in self.all_domains]
        if unknown or not self.domains or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"{name}: domains must be distinct names among {list(self.all_domains)}, got {self.domains}.")
        train, val = split_fractions
        if not (0 < train < 1 and 0 <= val < 1 and train + val <= 1):
            raise ValueError(f"{name}: split_fractions (train, val) must be in (0, 1) with a sum <= 1, got {split_fractions}.")
        self.split_fractions = (float(train), float(val))
        self.split_seed = split_seed
        self.split_lists = os.path.expanduser(split_lists) if split_lists is not None else None
        self.image_size = as_size(image_size, name)
        self.classes: list[str] = []

    def domain_folder(self, domain: str) -> str:
        """The class folders' parent of ``domain`` (``<root>/<domain>``, or ``…/images`` under it)."""
        names = [domain] + ([domain.replace("_", " ")] if "_" in domain else [])
        for candidate in names:
            path = os.path.join(self.root, candidate)
            if os.path.isdir(path):
                images = os.path.join(path, "images")
                return images if os.path.isdir(images) else path
        raise FileNotFoundError(
            f"{type(self).__name__}: no folder {' or '.join(repr(n) for n in names)} under root '{self.root}'. Expected the "
            f"{self.benchmark} layout <root>/<domain>/<class>/<image>.jpg with domains {list(self.all_domains)}; get the "
            f"archive from {self.source}. Nothing is downloaded."
        )

    def build_datasets(self) -> dict[str, dict[str, ImageFilesDataset]]:  # type: ignore[override]
        parts = self.listed_parts() if self.split_lists is not None else self.seeded_parts()
        datasets: dict[str, dict[str, ImageFilesDataset]] = {}
        for domain, by_split in parts.items():
            datasets[domain] = {
                split: ImageFilesDataset(paths, {domain: torch.tensor(labels, dtype=torch.long)}, self.image_size,
                                         IMAGENET_MEAN, IMAGENET_STD)
                for split, (paths, labels) in by_split.items() if paths
            }
            if "train" not in datasets[domain]:
                raise ValueError(f"{type(self).__name__}: domain '{domain}' has no training images after the split.")
        return datasets

    def seeded_parts(self) -> dict[str, dict[str, tuple[list[str], list[int]]]]:
        """``{domain: {split: (paths, labels)}}`` of the seeded split; labels index the sorted classes."""
        listing: dict[str, dict[str, list[str]]] = {}
        for domain in self.domains:
            folder = self.domain_folder(domain)
            classes = sorted(c for c in os.listdir(folder) if not c.startswith(".") and os.path.isdir(os.path.join(folder, c)))
            if not classes:
                raise FileNotFoundError(f"{folder}: no class folders; expected {folder}/<class>/<image>.jpg.")
            listing[domain] = {}
            for cls in classes:
                path = os.path.join(folder, cls)
                files = [f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
                if not files:
                    raise FileNotFoundError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}).")
                listing[domain][cls] = [os.path.join(path, f) for f in files]
        first = self.domains[0]
        self.classes = list(listing[first])
        for domain in self.domains[1:]:
            if list(listing[domain]) != self.classes:
                extra = sorted(set(listing[domain]) - set(self.classes))
                lacking = sorted(set(self.classes) - set(listing[domain]))
                raise ValueError(f"{type(self).__name__}: domain '{domain}' has other classes than '{first}': "
                                 f"extra {extra}, missing {lacking}. Every domain needs the same class folders.")
        out: dict[str, dict[str, tuple[list[str], list[int]]]] = {}
        for domain in self.domains:
            parts: dict[str, tuple[list[str], list[int]]] = {s: ([], []) for s in ("train", "val", "test")}
            for label, (cls, files) in enumerate(listing[domain].items()):
                names = [os.path.basename(f) for f in files]
                by_name = dict(zip(names, files))
                for split, chosen in seeded_split(names, self.split_fractions, self.split_seed, domain, cls).items():
                    parts[split][0].extend(by_name[n] for n in chosen)
                    parts[split][1].extend([label] * len(chosen))
            out[domain] = parts
        return out

    def listed_parts(self) -> dict[str, dict[str, tuple[list[str], list[int]]]]:
        """``{domain: {split: (paths, labels)}}`` read from LibMTL's ``<domain>_<split>.txt`` lists."""
        out: dict[str, dict[str, tuple[list[str], list[int]]]] = {}
        classes: dict[int, str] = {}
        for domain in self.domains:
            folder = self.domain_folder(domain)  # raises with the expected layout when the domain is absent
            out[domain] = {}
            for split in ("train", "val", "test"):
                path = os.path.join(str(self.split_lists), f"{domain}_{split}.txt")
                if not os.path.isfile(path):
                    raise FileNotFoundError(
                        f"{type(self).__name__}: split_lists has no {domain}_{split}.txt ({path}); expected LibMTL's lists "
                        f"<domain>_{{train,val,test}}.txt (examples/office/data_txt/ of github.com/median-research-group/LibMTL)."
                    )
                paths, labels = [], []
                with open(path, encoding="utf-8") as f:
                    for number, line in enumerate(f, start=1):
                        if not line.strip():
                            continue
                        name, _, label = line.rstrip("\n").rpartition(" ")
                        if not name or not label.strip().isdigit():
                            raise ValueError(f"{path}, line {number}: expected '<image path> <label>', got {line.strip()!r}.")
                        image = self._listed_image(name, folder)
                        if image is None:
                            raise FileNotFoundError(f"{path}, line {number}: image '{name}' not found under root '{self.root}'.")
                        paths.append(image)
                        labels.append(int(label))
                        cls = os.path.basename(os.path.dirname(image))
                        if classes.setdefault(int(label), cls) != cls:
                            raise ValueError(f"{path}, line {number}: label {label} is class '{cls}', but elsewhere "
                                             f"'{classes[int(label)]}'.")
                out[domain][split] = (paths, labels)
        self.classes = [classes.get(i, "") for i in range(max(classes) + 1)] if classes else []
        return out

    def _listed_image(self, name: str, folder: str) -> Optional[str]:
        """The file of a list entry: ``<root>/<name>``, or the same path under the domain's folder as
        found on disk (``Real World`` for ``Real_World``, with or without ``images/``)."""
        direct = os.path.join(self.root, name)
        if os.path.isfile(direct):
            return direct
        parts = name.replace("\\", "/").split("/")
        tail = parts[2:] if len(parts) > 3 and parts[1] == "images" else parts[1:]
        moved = os.path.join(folder, *tail)
        return moved if os.path.isfile(moved) else None


class Office31DataModule(OfficeDataModule):
    """Office-31: ``amazon``, ``dslr``, ``webcam``, 31 classes (see the module docstring)."""

    all_domains = OFFICE31_DOMAINS
    benchmark = "Office-31"
    source = "www.cc.gatech.edu/~judy/domainadapt/ (the link in LibMTL's examples/office/README.md)"


class OfficeHomeDataModule(OfficeDataModule):
    """Office-Home: ``Art``, ``Clipart``, ``Product``, ``Real_World``, 65 classes (see the module docstring)."""

    all_domains = OFFICE_HOME_DOMAINS
    benchmark = "Office-Home"
    source = "www.hemanthdv.org/officeHomeDataset.html (the link in LibMTL's examples/office/README.md)"


__all__ = ["OfficeDataModule", "Office31DataModule", "OfficeHomeDataModule", "OFFICE31_DOMAINS", "OFFICE_HOME_DOMAINS",
           "seeded_split", "split_counts"]
