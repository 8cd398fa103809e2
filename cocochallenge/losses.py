"""Losses: the course's BCE and the asymmetric loss (ASL) for multi-label classification."""
from __future__ import annotations

from torch import nn


class AsymmetricLoss(nn.Module):
    """Asymmetric loss for multi-label classification (Ridnik et al., ICCV 2021), from timm.

    With 80 classes and ~3 positives per image, easy negatives dominate BCE. ASL focuses the
    negatives (``gamma_neg``) and shifts their probability down by ``clip`` so that very easy
    negatives give no gradient at all; positives keep a plain log loss (``gamma_pos=0``, the
    paper's COCO setting; timm's default is 1). The loss is the mean over images of the
    per-image sum, so the loss printed per epoch does not depend on the batch size: timm's
    ``reduction="batchmean"`` where the installed timm has it, else timm's sum divided here.
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05,
                 eps: float = 1e-8):
        super().__init__()
        import inspect

        from timm.loss import AsymmetricLossMultiLabel
        self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip
        kwargs = dict(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=eps)
        self.divide = "reduction" not in inspect.signature(AsymmetricLossMultiLabel).parameters
        self.loss = AsymmetricLossMultiLabel(**kwargs, **({} if self.divide else {"reduction": "batchmean"}))

    def forward(self, logits, targets):
        loss = self.loss(logits.float(), targets.float())
        return loss / max(len(logits), 1) if self.divide else loss

    def extra_repr(self) -> str:
        return f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}"


def make_criterion(name: str = "bce") -> nn.Module:
    """``bce`` (BCEWithLogitsLoss, the course's) or ``asl`` (:class:`AsymmetricLoss`)."""
    if name == "bce":
        return nn.BCEWithLogitsLoss()
    if name == "asl":
        return AsymmetricLoss()
    raise ValueError(f"unknown loss {name!r}: 'bce' or 'asl'")
