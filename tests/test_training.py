"""The weights' moving average in the epoch loop, and the projected GPU hours of a run."""
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import helpers as h
from cocochallenge import budget, checkpoints, models, training

ROOT = Path(__file__).resolve().parents[1]


def _loader(n=24, batch=8, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = (torch.rand(n, h.NUM_CLASSES, generator=g) < 0.2).float()
    return training.feature_loader(x, y, batch, shuffle=False)


def test_train_loop_updates_the_moving_average_after_every_step():
    torch.manual_seed(0)
    net = nn.Linear(5, h.NUM_CLASSES)
    loader = _loader()
    ema = training.make_ema(net, steps_per_epoch=len(loader), epochs=1.0)
    assert ema.decay == pytest.approx(1 - 1 / 3)
    # the same epoch by hand: SGD steps, and after each one ema <- decay * ema + (1 - decay) * weights
    ref = nn.Linear(5, h.NUM_CLASSES)
    ref.load_state_dict(net.state_dict())
    avg = {k: v.clone() for k, v in ref.state_dict().items()}
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    crit = nn.BCEWithLogitsLoss()
    for x, y in loader:
        opt_ref.zero_grad()
        crit(ref(x), y).backward()
        opt_ref.step()
        for k, v in ref.state_dict().items():
            avg[k] = ema.decay * avg[k] + (1 - ema.decay) * v
    h.train_loop(loader, net, crit, torch.optim.SGD(net.parameters(), lr=0.5), "cpu", ema=ema)
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, avg[k])
        assert not torch.allclose(v, net.state_dict()[k])      # an average, not a copy of the weights


def test_no_moving_average_when_switched_off():
    assert training.make_ema(nn.Linear(2, 2), steps_per_epoch=10, epochs=0) is None


def test_best_checkpoint_keeps_the_average_when_it_scored_higher(tmp_path):
    net, avg = nn.Linear(3, 2), nn.Linear(3, 2)
    ckpt = checkpoints.PhaseCheckpoint(tmp_path, "finetune", {"model": net})
    assert ckpt.save(0, {"epoch": 1}, score=0.5, best_module=avg)
    fresh = nn.Linear(3, 2)
    ckpt.load_best(fresh)
    torch.testing.assert_close(fresh.weight, avg.weight)
    assert not torch.allclose(fresh.weight, net.weight)
    assert not ckpt.save(1, {"epoch": 2}, score=0.4)           # not better: best.pt unchanged
    ckpt.load_best(fresh)
    torch.testing.assert_close(fresh.weight, avg.weight)


def test_epoch_line_shows_the_average_only_when_there_is_one():
    train, val = {"loss": 0.1}, {"loss": 0.2, "f1": 0.3, "mAP": 0.4}
    with_ema = checkpoints.epoch_line(checkpoints.epoch_row("finetune", 7, 6, 999.9, train, val, {"mAP": 0.45}), 12, True)
    plain = checkpoints.epoch_line(checkpoints.epoch_row("frozen", 0, 0, 1.0, train, val), 12, False)
    assert "EMA 0.4500" in with_ema and len(with_ema) <= 90 and "EMA" not in plain


def test_every_backbone_has_a_reference_rate_and_more_epochs_cost_more():
    assert set(budget.REFERENCE_TRAIN_IPS) == set(models.BACKBONES)
    size_of = lambda n: models.preprocess_for(n)["size"]  # noqa: E731
    few = budget.projected_hours(models.BACKBONES, size_of, epochs_finetune=4)
    many = budget.projected_hours(models.BACKBONES, size_of, epochs_finetune=8)
    assert all(0 < few[n] < many[n] for n in models.BACKBONES)
    # a bigger input costs more pixels, at the same reference rate
    assert budget.reference_rates("convnext_tiny", 288)["train"] < budget.reference_rates("convnext_tiny", 224)["train"]


def test_parameters_cell_states_the_hours_of_its_own_defaults():
    """The comment in the parameters cell is what budget.py projects for the cell's defaults."""
    nb = json.loads((ROOT / "challenge.ipynb").read_text())
    cell = next("".join(c["source"]) for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    ns = {}
    exec("\n".join(line for line in cell.splitlines() if re.match(r"^[A-Z_]+ = ", line)), ns)
    hours = budget.projected_hours(ns["BACKBONES"], lambda n: models.preprocess_for(n, ns["IMG_SIZE"])["size"],
                                   ns["EPOCHS_FINETUNE"], tta=ns["TTA"], ema=ns["EMA_EPOCHS"] > 0)
    stated = dict(re.findall(r"(\w+) (\d+\.\d+) h", cell))
    assert set(stated) == set(ns["BACKBONES"])
    for name, value in hours.items():
        assert stated[name] == f"{value:.2f}", (name, stated[name], value)
