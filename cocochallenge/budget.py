"""What a run will cost on a GPU, before it starts.

Why: a team on the course hub has a few GPU hours, and the parameters cell should say what its
default run costs per backbone before anyone presses run. No GPU has been measured by this
project yet, so the rates are references, and labelled as such:

- training images/s: timm's published benchmark on an RTX 3090 (mixed precision, channels-last,
  PyTorch 1.12; ``results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv`` of
  pytorch-image-models), for the timm model closest to ours, scaled to our input size by pixel
  count (compute grows with the pixels);
- forward-only passes (features, validation, test) at 3x the training rate: a backward pass
  costs about twice a forward one;
- the loader: 340 training images/s per worker at 224 px, measured on one core of this
  project's CPU on real COCO photos (decode, resize and pad, TrivialAugment, tensor), scaled by
  pixel count, times the workers. The slower of the GPU and the loader sets the pace.

``python benchmark.py --device cuda`` measures the real rates on your GPU and prints its own
projection; ``tools/gpu_check.py`` runs it.
"""

from __future__ import annotations

#: backbone -> (training images/s on an RTX 3090 with AMP, the input size it was measured at,
#: the row of timm's file it comes from). Rows read at commit c865028c of
#: pytorch-image-models (2022-07-27, the file's last version).
REFERENCE_TRAIN_IPS = {
    "mobilenet_v3_large": (2732.0, 224, "mobilenetv3_large_100"),
    "resnet50": (1218.0, 224, "resnet50"),
    "efficientnet_v2_s": (488.0, 300, "tf_efficientnetv2_s"),
    "convnext_tiny": (819.0, 224, "convnext_tiny"),
    "convnext_small": (487.0, 224, "convnext_small"),
    "efficientnet_v2_m": (173.0, 384, "tf_efficientnetv2_m"),
    "efficientnet_lite0": (2135.0, 224, "tf_efficientnet_lite0"),
    "efficientnet_lite1": (1443.0, 240, "tf_efficientnet_lite1"),
    "efficientnet_lite2": (1121.0, 260, "tf_efficientnet_lite2"),
    # MaxViT came to timm after that file: no training row exists. Derived from its RTX 3090
    # inference file (benchmark-infer-amp-nhwc-pt240-cu124-rtx3090.csv, both at 224 px):
    # convnext_tiny's 819 x maxvit_tiny_tf_224's 1398.6 / convnext_tiny's 3120.2 images/s.
    # maxvit_tiny_tf_224 is torchvision's maxvit_t (the same network: 30.9 M, 5.6 GFLOPs).
    "maxvit_t": (367.0, 224, "maxvit_tiny_tf_224 (derived from inference, see above)"),
    "convnext_tiny_in22k": (819.0, 224, "convnext_tiny_in22ft1k"),
    # regnety_160 channels-last: 83 images/s, 3.2x slower than its channels-first row (264) of
    # the same benchmark's NCHW file (grouped convolutions in PyTorch 1.12): a pessimistic figure
    # for a frozen backbone; the pre-flight (python -m cocochallenge preflight) measures it.
    "regnet_y_16gf_swag": (83.2, 224, "regnety_160"),
    "regnet_y_16gf_swag_linear": (83.2, 224, "regnety_160"),
}
REFERENCE_GPU = "RTX 3090, AMP, channels-last (timm's published training benchmark)"
LOADER_IPS_PER_WORKER_224 = 340.0
FORWARD_SPEEDUP = 3.0
#: the course data (DESIGN.md): training images after a 10% validation split, validation, test
COURSE_SIZES = {"n_train": 58_000, "n_val": 6_500, "n_test": 4_952}


def reference_rates(name: str, size: int, workers: int = 8) -> dict:
    """Images/s of training and of forward passes at ``size`` px, the loader's cap applied."""
    ips, at, _ = REFERENCE_TRAIN_IPS[name]
    train = ips * (at / size) ** 2
    loader = LOADER_IPS_PER_WORKER_224 * (224 / size) ** 2 * max(1, workers)
    return {
        "train": min(train, loader),
        "forward": min(FORWARD_SPEEDUP * train, loader),
        "bound": "loader" if loader < train else "GPU",
    }


def run_seconds(
    rates: dict,
    n_train: int,
    n_val: int,
    n_test: int,
    epochs_finetune: int,
    tta: bool = True,
    ema: bool = True,
) -> float:
    """Seconds of one backbone's run: features once, fine-tuning epochs, final predictions.

    Features of train + validation once (the frozen phase's head epochs on cached features
    are seconds); each fine-tuning epoch trains on ``n_train`` images and validates (twice
    with an EMA); the kept model then scores validation and test (twice each with flip TTA).
    ``rates`` holds images/s under ``train`` and ``forward``, and may hold a measured ``tta``
    rate (images/s with flip TTA, as ``benchmark.py`` measures it) for the final predictions.
    """
    final = (
        (n_val + n_test) / rates["tta"]
        if tta and "tta" in rates
        else (2 if tta else 1) * (n_val + n_test) / rates["forward"]
    )
    per_epoch = n_train / rates["train"] + (2 if ema else 1) * n_val / rates["forward"]
    return (n_train + n_val) / rates["forward"] + epochs_finetune * per_epoch + final


def finetune_epochs(name: str, epochs_finetune: int, frozen_only=()) -> int:
    """The fine-tuning epochs ``name`` will run: none for a backbone trained frozen only (the
    ``frozen_only`` option), whose cost is its features and its predictions."""
    return 0 if name in frozen_only else epochs_finetune


def projected_hours(
    backbones,
    size_of,
    epochs_finetune: int,
    tta: bool = True,
    ema: bool = True,
    workers: int = 8,
    sizes: dict | None = None,
    frozen_only=(),
) -> dict:
    """``{backbone: hours}`` at the reference rates; ``size_of(name)`` gives its input size,
    ``frozen_only`` the backbones that run no fine-tuning epoch."""
    sizes = sizes or COURSE_SIZES
    return {
        name: run_seconds(
            reference_rates(name, size_of(name), workers),
            epochs_finetune=finetune_epochs(name, epochs_finetune, frozen_only),
            tta=tta,
            ema=ema,
            **sizes,
        )
        / 3600
        for name in backbones
    }
