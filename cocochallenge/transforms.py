"""Transforms and loaders: aspect-keeping resize and pad, augmentation, device-aware loaders."""
from __future__ import annotations

import os

import torch
from PIL import Image
from torch.utils.data import DataLoader

class ResizePad:
    """Resize so the long side is ``size`` (aspect kept), then pad to a square.

    The challenge images are not square (short side 59..224 px): the course's plain
    ``Resize((224, 224))`` stretches them, which distorts shapes, while padding spends a
    quarter or more of the input on nothing. On 678 real photos the stretched images scored
    higher (frozen EfficientNet-Lite features, tools/ablation), so the notebook's default is
    the plain resize and this is the option (``PAD = True``). The padding colour is the
    normalisation mean, so padded pixels become zeros after normalisation.
    """

    def __init__(self, size: int, fill=(124, 116, 104)):
        self.size = size
        self.fill = tuple(int(v) for v in fill)

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        scale = self.size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BILINEAR)
        if (nw, nh) == (self.size, self.size):
            return img
        canvas = Image.new("RGB", (self.size, self.size), self.fill)
        canvas.paste(img, ((self.size - nw) // 2, (self.size - nh) // 2))
        return canvas

    def __repr__(self):
        return f"ResizePad(size={self.size}, fill={self.fill})"


def build_transform(preprocess: dict, train: bool = False, pad: bool = True,
                    augment: str = "trivial", erasing: float = 0.25):
    """Evaluation or training transform for the normalisation of the chosen weights.

    ``preprocess`` comes from :func:`build_model` (size, mean, std of *those* weights: Lite0
    wants mean 0.5 / std 0.5, the torchvision models the ImageNet statistics). ``pad``
    switches between aspect-keeping resize + pad and the course's plain resize. Training adds
    a horizontal flip (COCO objects are left-right symmetric), a standard policy
    (``trivial`` = TrivialAugmentWide, ``randaugment``, or ``none``) and random erasing.
    """
    from torchvision import transforms as T
    size, mean, std = preprocess["size"], preprocess["mean"], preprocess["std"]
    steps = [ResizePad(size, fill=[round(m * 255) for m in mean]) if pad else T.Resize((size, size))]
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


def make_loader(dataset, batch_size: int, train: bool, device: torch.device | str = "cpu",
                workers: int | None = None, persistent: bool | None = None) -> DataLoader:
    """A DataLoader set up for the device: workers, pinned memory and prefetching on CUDA.

    The course's ``DataLoader(ds, batch_size, shuffle)`` decodes JPEGs in the main process,
    which starves a GPU. Shuffling and the workers' seeds draw from torch's global generator,
    which the epoch loop reseeds from ``(seed, epoch)``: a resumed epoch sees the same order
    and the same augmentations as the uninterrupted run. ``persistent`` forces the GPU's
    persistent workers on a CPU (tests rehearse the GPU's loader settings that way).
    """
    dev = torch.device(device)
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if dev.type == "cuda" else min(2, os.cpu_count() or 1)
    kwargs = dict(batch_size=batch_size, shuffle=train, drop_last=train and len(dataset) > batch_size,
                  num_workers=workers, pin_memory=dev.type == "cuda")
    if workers > 0:
        # persistent workers keep their RNG across epochs, which a resumed run cannot replay;
        # on CUDA the start-up saving is worth it, on a CPU reproducibility wins.
        kwargs.update(persistent_workers=dev.type == "cuda" if persistent is None else persistent,
                      prefetch_factor=4)
    return DataLoader(dataset, **kwargs)
