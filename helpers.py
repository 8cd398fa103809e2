"""The course's provided building blocks, names and signatures kept, improved behind them.

``COCOTrainImageDataset``, ``COCOTestImageDataset``, ``train_loop``, ``validation_loop`` and
``update_graphs`` are what the course hands out and what ``challenge.ipynb`` glues together.
Called as the course calls them they behave as the course's code does (``tests/`` checks the
metric against a verbatim copy); the keyword-only arguments after the course's complete them
for this project: mixed precision, channels-last, a per-step scheduler, progress bars, and
the validation probabilities that thresholds and mAP need. Everything else of the library is
in the package ``cocochallenge`` beside this file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cocochallenge.config import CLASSES, NUM_CLASSES, progress
from cocochallenge.data import LAYOUT_HELP, DataError, LabelledSubset, list_files, load_rgb, read_label_matrix
from cocochallenge.metrics import course_scores, mean_average_precision
from cocochallenge.training import EpochCounts, autocast, optimizer_step, to_device

__all__ = ["CLASSES", "NUM_CLASSES", "COCOTrainImageDataset", "COCOTestImageDataset", "train_loop",
           "validation_loop", "update_graphs"]


class COCOTrainImageDataset(Dataset):
    """The course's training dataset: ``(image, 80-dim multi-hot float tensor)``.

    Same signature and items as the course's. Behind it, every label file is parsed once at
    construction into ``self.labels`` (an ``(N, 80)`` uint8 matrix) that splits, class
    statistics and the analysis reuse. ``self.img_labels`` keeps the course's list of label
    file names; ``self.stems`` the image ids.
    """

    def __init__(self, img_dir, annotations_dir, max_images=None, transform=None):
        self.img_dir = Path(img_dir)
        self.annotations_dir = Path(annotations_dir)
        for folder in (self.img_dir, self.annotations_dir):
            if not folder.is_dir():
                raise DataError(f"{folder} does not exist.\n{LAYOUT_HELP}")
        self.img_labels = list_files(self.annotations_dir, ".cls")
        if max_images:
            self.img_labels = self.img_labels[:max_images]
        if not self.img_labels:
            raise DataError(f"no .cls label file in {self.annotations_dir}.\n{LAYOUT_HELP}")
        self.stems = [name[:-4] for name in self.img_labels]
        self.transform = transform
        self.label_notes = []
        self.labels = read_label_matrix(self.annotations_dir, self.img_labels, self.label_notes)

    def __len__(self):
        return len(self.img_labels)

    def image_path(self, idx: int) -> Path:
        return self.img_dir / f"{self.stems[idx]}.jpg"

    def target(self, idx: int) -> torch.Tensor:
        return torch.from_numpy(self.labels[idx].astype(np.float32))

    def __getitem__(self, idx):
        image = load_rgb(self.image_path(idx))
        if self.transform:
            image = self.transform(image)
        return image, self.target(idx)

    def drop(self, stems) -> None:
        """Leave images out (unreadable ones found by :func:`scan_data`), labels kept in sync."""
        stems = set(stems)
        keep = [i for i, s in enumerate(self.stems) if s not in stems]
        self.img_labels = [self.img_labels[i] for i in keep]
        self.stems = [self.stems[i] for i in keep]
        self.labels = self.labels[keep]

    def subset(self, indices, transform) -> "LabelledSubset":
        """A view on some images with its own transform (see :class:`LabelledSubset`)."""
        return LabelledSubset(self, indices, transform)



class COCOTestImageDataset(Dataset):
    """The course's test dataset: ``(image, file stem)``, images in sorted order."""

    def __init__(self, img_dir, transform=None):
        self.img_dir = Path(img_dir)
        if not self.img_dir.is_dir():
            raise DataError(f"{self.img_dir} does not exist.\n{LAYOUT_HELP}")
        self.image_files = list_files(self.img_dir, ".jpg")
        if not self.image_files:
            raise DataError(f"no .jpg image in {self.img_dir}.\n{LAYOUT_HELP}")
        self.stems = [name[:-4] for name in self.image_files]
        self.transform = transform

    def __len__(self):
        return len(self.image_files)

    def __getitem__(self, idx):
        image = load_rgb(self.img_dir / self.image_files[idx])
        if self.transform:
            image = self.transform(image)
        return image, self.stems[idx]


def train_loop(train_loader, net, criterion, optimizer, device, mbatch_loss_group=-1, *,
               scheduler=None, amp_dtype=None, scaler=None, channels_last=False, show_progress=False,
               desc="train", ema=None):
    """The course's training epoch, completed for speed and for ``update_graphs``.

    As in the course: ``zero_grad``, forward, loss, ``backward``, ``step`` per mini-batch, and
    with ``mbatch_loss_group > 0`` the list of mean losses per group of that many batches is
    returned. Otherwise (where the course returned None) it returns the training metrics of
    the epoch (``loss``, ``accuracy``, ``f1``, ``precision``, ``recall`` at probability 0.5),
    summed on the device and read once: no ``.item()`` per batch, which would make a GPU wait
    for the CPU at every step. Completions: ``scheduler`` stepped per batch, autocast to
    ``amp_dtype`` (with a ``scaler`` for float16), channels-last images, a progress bar, and
    an ``ema`` (timm's ``ModelEmaV3``, see ``training.make_ema``) updated after every step.
    """
    net.train()
    counts = EpochCounts(NUM_CLASSES, device)
    running_loss, mbatch_losses = 0.0, []
    for i, data in enumerate(progress(train_loader, show_progress, desc=desc, leave=False)):
        inputs = to_device(data[0], device, channels_last)
        labels = data[1].to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            outputs = net(inputs)
            loss = criterion(outputs.float(), labels)
        optimizer_step(loss, optimizer, scheduler, scaler)       # zero_grad, backward, step
        if ema is not None:
            ema.update(getattr(net, "_orig_mod", net))            # the module under torch.compile
        counts.add(outputs, labels, loss)
        if mbatch_loss_group > 0:
            running_loss += loss.item()
            if i % mbatch_loss_group == mbatch_loss_group - 1:
                mbatch_losses.append(running_loss / mbatch_loss_group)
                running_loss = 0.0
    if mbatch_loss_group > 0:
        return mbatch_losses
    return counts.result()


def validation_loop(val_loader, net, criterion, num_classes, device,
                    multi_label=False, th_multi_label=0.5, one_hot=False, class_metrics=False, *,
                    keep_outputs=False, amp_dtype=None, channels_last=False, show_progress=False,
                    desc="validate"):
    """The course's validation: loss, accuracy, and the course's weighted F1, P and R.

    Same arguments and numbers as the course's code (a test checks parity on the same inputs),
    including its convention that ``th_multi_label`` applies to the raw outputs: with
    ``BCEWithLogitsLoss`` 0.5 on a logit means a probability of 0.62, and 0.0 means 0.5.
    Where the course code divides by zero (a class with no positives) the result stays finite,
    see ``course_scores``. With ``class_metrics`` a list of ``{"f1", "precision", "recall"}``
    per class comes second, as in the course. Completions: ``keep_outputs`` adds the sigmoid
    probabilities (``probs``, an ``(N, C)`` array) and their ``mAP``, which the epoch loop
    selects the best epoch by; autocast, channels-last and a progress bar as in ``train_loop``.
    """
    net.eval()
    loss = 0.0
    size = len(val_loader.dataset)
    tp = torch.zeros(num_classes, dtype=torch.float64, device=device)
    fp = torch.zeros_like(tp)
    total = torch.zeros_like(tp)
    kept, kept_labels = [], []
    with torch.no_grad():
        for data in progress(val_loader, show_progress, desc=desc, leave=False):
            images, labels = to_device(data[0], device, channels_last), data[1].to(device)
            with autocast(device, amp_dtype):
                outputs = net(images).float()
            loss += criterion(outputs, labels).item() * images.size(0)
            if not multi_label:
                predictions = torch.zeros_like(outputs)
                predictions[torch.arange(outputs.shape[0]), torch.argmax(outputs, dim=1)] = 1.0
            else:
                predictions = (outputs > th_multi_label).to(outputs.dtype)
            if not one_hot:
                labels_mat = torch.zeros_like(outputs)
                labels_mat[torch.arange(outputs.shape[0]), labels] = 1.0
                labels = labels_mat
            tps = predictions * labels
            tp += tps.sum(0).double()
            fp += (predictions - tps).sum(0).double()
            total += labels.sum(0).double()
            if keep_outputs:
                kept.append(torch.sigmoid(outputs).cpu())
                kept_labels.append(labels.cpu())
    s = course_scores(tp.cpu().numpy(), fp.cpu().numpy(), total.cpu().numpy())
    results = {"loss": loss / size, "accuracy": s["accuracy"], "f1": s["f1"],
               "precision": s["precision"], "recall": s["recall"]}
    if keep_outputs:
        results["probs"] = torch.cat(kept).numpy()
        results["mAP"] = mean_average_precision(torch.cat(kept_labels).numpy(), results["probs"])
    if class_metrics:
        class_results = []
        for p, r in zip(s["class_precision"], s["class_recall"]):
            f1 = 0.0 if p == 0 or r == 0 else 2.0 / (1.0 / p + 1.0 / r)
            class_results.append({"f1": float(f1), "precision": float(p), "recall": float(r)})
        return results, class_results
    return results


def update_graphs(summary_writer, epoch, train_results, test_results,
                  train_class_results=None, test_class_results=None,
                  class_names=None, mbatch_group=-1, mbatch_count=0, mbatch_losses=None):
    """The course's TensorBoard logging: train against validation loss, accuracy, F1, P, R.

    ``train_results`` and ``test_results`` are dicts with ``loss``, ``accuracy``, ``f1``,
    ``precision`` and ``recall`` (what :func:`validation_loop` and :func:`train_loop`
    return). Per-class curves are written when both per-class lists are given.
    """
    step = (epoch + 1) if not mbatch_group > 0 else (epoch + 1) * mbatch_count
    if mbatch_group > 0 and mbatch_losses:
        for i, value in enumerate(mbatch_losses):
            summary_writer.add_scalar("Losses/Train mini-batches", value,
                                      epoch * mbatch_count + (i + 1) * mbatch_group)
    summary_writer.add_scalars("Losses/Train Loss vs Test Loss",
                               {"Train Loss": train_results["loss"],
                                "Test Loss": test_results["loss"]}, step)
    for title, key in (("Accuracy", "accuracy"), ("F1", "f1"), ("Precision", "precision"),
                       ("Recall", "recall")):
        summary_writer.add_scalars(f"Metrics/Train {title} vs Test {title}",
                                   {f"Train {title}": train_results[key],
                                    f"Test {title}": test_results[key]}, step)
    if train_class_results and test_class_results:
        names = class_names or CLASSES
        for i in range(len(train_class_results)):
            for title, key in (("F1", "f1"), ("Precision", "precision"), ("Recall", "recall")):
                summary_writer.add_scalars(f"Class Metrics/{names[i]}/Train {title} vs Test {title}",
                                           {f"Train {title}": train_class_results[i][key],
                                            f"Test {title}": test_class_results[i][key]}, step)
    summary_writer.flush()

