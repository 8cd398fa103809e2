"""The completed train_loop (scheduler, EMA), checkpoints, and the projected GPU hours."""

import pytest
import torch
from torch import nn

import helpers as h
from cocochallenge import budget, checkpoints, config, files, models, training
from cocochallenge.config import NUM_CLASSES


def _loader(n=24, batch=8, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = (torch.rand(n, NUM_CLASSES, generator=g) < 0.2).float()
    return training.feature_loader(x, y, batch, shuffle=False)


def test_train_loop_updates_the_moving_average_after_every_step():
    torch.manual_seed(0)
    net = nn.Linear(5, NUM_CLASSES)
    loader = _loader()
    ema = training.make_ema(net, steps_per_epoch=len(loader), epochs=1.0)
    assert ema.decay == pytest.approx(1 - 1 / 3)
    # the same epoch by hand: SGD steps, and after each ema <- decay * ema + (1 - decay) * weights
    ref = nn.Linear(5, NUM_CLASSES)
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
        assert not torch.allclose(v, net.state_dict()[k])  # an average, not a copy of the weights


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
    assert not ckpt.save(1, {"epoch": 2}, score=0.4)  # not better: best.pt unchanged
    ckpt.load_best(fresh)
    torch.testing.assert_close(fresh.weight, avg.weight)


def test_epoch_line_shows_the_average_only_when_there_is_one():
    train, val = {"loss": 0.1}, {"loss": 0.2, "f1": 0.3, "mAP": 0.4}
    with_ema = checkpoints.epoch_line(
        checkpoints.epoch_row("finetune", 7, 6, 999.9, train, val, {"mAP": 0.45}), 12, True
    )
    plain = checkpoints.epoch_line(
        checkpoints.epoch_row("frozen", 0, 0, 1.0, train, val), 12, False
    )
    assert "EMA 0.450 " in with_ema and len(with_ema) <= 90 and "EMA" not in plain


def test_every_backbone_has_a_reference_rate_and_more_epochs_cost_more():
    assert set(budget.REFERENCE_TRAIN_IPS) == set(models.BACKBONES)
    size_of = lambda n: models.preprocess_for(n)["size"]  # noqa: E731
    few = budget.projected_hours(models.BACKBONES, size_of, epochs_finetune=4)
    many = budget.projected_hours(models.BACKBONES, size_of, epochs_finetune=8)
    assert all(0 < few[n] < many[n] for n in models.BACKBONES)
    # a bigger input costs more pixels, at the same reference rate
    assert (
        budget.reference_rates("convnext_tiny", 288)["train"]
        < budget.reference_rates("convnext_tiny", 224)["train"]
    )


def test_train_loop_as_the_course_calls_it_and_with_its_completions():
    """Called as the course calls it, it returns nothing but trains (with mbatch_loss_group, the
    course's grouped losses); the completions step the scheduler per batch and return the
    epoch's mean loss."""
    torch.manual_seed(0)
    loader = _loader(n=24, batch=8)
    net, crit = nn.Linear(5, NUM_CLASSES), nn.BCEWithLogitsLoss()
    before = net.weight.detach().clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    assert "loss" in h.train_loop(loader, net, crit, opt, "cpu")
    assert not torch.allclose(before, net.weight)
    losses = h.train_loop(loader, net, crit, opt, "cpu", mbatch_loss_group=1)
    assert len(losses) == 3 and all(v > 0 for v in losses)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    res = h.train_loop(loader, net, crit, opt, "cpu", scheduler=sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 / 8)  # three steps, one per batch
    with torch.no_grad():
        expected = sum(float(crit(net(x), y)) for x, y in loader) / 3
    assert res["loss"] > expected  # the mean over the epoch's batches, before their updates


def test_update_graphs_draws_what_train_loop_reports(tmp_path):
    """The course's update_graphs with train_loop's results (the loss only): every chart is
    written, the metric charts with their validation line."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from torch.utils.tensorboard import SummaryWriter

    val = {"loss": 0.2, "accuracy": 0.5, "f1": 0.3, "precision": 0.4, "recall": 0.25}
    with SummaryWriter(str(tmp_path)) as writer:
        h.update_graphs(writer, 0, {"loss": 0.1}, val)
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path))
    mux.Reload()
    runs = set(mux.Runs())
    assert any("Train Loss vs Test Loss_Train Loss" in r for r in runs)
    assert any("Train F1 vs Test F1_Test F1" in r for r in runs)
    assert not any("Train F1 vs Test F1_Train F1" in r for r in runs)


def test_the_hours_command_prints_the_projection(capsys):
    """The GPU-hour projection left the notebook for `python -m cocochallenge hours`."""
    from cocochallenge import cli

    names = ["convnext_tiny", "mobilenet_v3_large"]
    assert cli.main(["hours", *names, "--epochs-finetune", "4"]) == 0
    out = capsys.readouterr().out
    size = lambda n: models.preprocess_for(n)["size"]  # noqa: E731
    hours = budget.projected_hours(names, size, epochs_finetune=4)
    for name in names:
        assert f"{hours[name]:.2f}" in out.split(name)[1].splitlines()[0]
    assert f"{sum(hours.values()):.2f}" in out.splitlines()[-1]


def test_keep_freed_memory_stops_the_page_faults_of_every_batch():
    """Three forward passes of Lite0 in fresh processes: glibc's default hands each batch's
    buffers back and faults them in again (hundreds of thousands of minor page faults); with
    config.keep_freed_memory the warm passes reuse them."""
    import os
    import subprocess
    import sys

    probe = """
import resource, sys, torch
from cocochallenge import config, models
if sys.argv[1] == "keep":
    print(config.keep_freed_memory(), file=sys.stderr)
torch.set_num_threads(1)
m, _ = models.build_model("efficientnet_lite0", pretrained=False)
m.eval()
x = torch.randn(16, 3, 160, 160)
with torch.inference_mode():
    m.backbone(x)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        m.backbone(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    faults = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", probe, mode], env=env, capture_output=True,
                             text=True, check=True)  # fmt: skip
        faults[mode] = int(out.stdout.strip().splitlines()[-1])
    assert faults["default"] > 50_000 and faults["keep"] < 0.1 * faults["default"], faults


@pytest.mark.quick
def test_kept_memory_is_never_handed_back_however_large():
    """2.5 GB freed at the top of the heap stay with the process, with run.py's GLIBC_TUNABLES
    and with config.keep_freed_memory alike: a trim threshold of 2 GB handed 2 GB back, which
    a batch of Lite2 at 384 px then faulted in again (README, "Speed"). The blocks are never
    written (calloc'ed from fresh memory), so this costs neither memory nor page faults."""
    import os
    import subprocess
    import sys

    import run

    assert run.TUNABLES == config.TUNABLES  # run.py spells it without importing torch
    probe = """
import ctypes, sys
import numpy as np
if sys.argv[1] == "keep":
    from cocochallenge import config
    print(config.keep_freed_memory(), file=sys.stderr)
libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
blocks = [np.zeros(64 * 2**20, np.uint8) for _ in range(40)]
end = libc.sbrk(0)
del blocks
print(end - libc.sbrk(0))
"""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    handed_back = {}
    for mode, tunables in (("env", run.TUNABLES), ("keep", None)):
        mode_env = {**env, "GLIBC_TUNABLES": tunables} if tunables else env
        out = subprocess.run([sys.executable, "-c", probe, mode], env=mode_env,
                             capture_output=True, text=True, check=True)  # fmt: skip
        handed_back[mode] = int(out.stdout.strip().splitlines()[-1])
    assert handed_back == {"env": 0, "keep": 0}


class _Recorder(nn.Module):
    """A backbone that records the rows of every batch it sees (its features: the rows' sums)."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x):
        self.batches.append(len(x))
        return x.flatten(1).sum(1, keepdim=True).repeat(1, 3)


def _parts(workers=0):
    """A train part (images, labels) and a test part (images, file stems), in ordered loaders."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.rand(6, 1, 2, 2, generator=g), torch.zeros(6, NUM_CLASSES))
    stems = [f"{i:012d}" for i in range(3)]
    test = [(x, s) for x, s in zip(torch.rand(3, 1, 2, 2, generator=g), stems)]
    parts = {"train": train, "test": test}
    return {p: DataLoader(d, batch_size=4, num_workers=workers) for p, d in parts.items()}


def test_feature_parts_come_from_one_pass_and_equal_each_part_alone(tmp_path):
    """One loader over both parts (batches of 4, 4, 1 where two loaders give 4, 2 and 3), its
    rows split back per part; each file is the one cached_features reads with the part's key."""
    loaders, key = _parts(), {"backbone": "b", "images": "split1"}
    paths = {p: tmp_path / f"features_{p}.pt" for p in loaders}
    backbone = _Recorder()
    feats = training.cached_feature_parts(
        paths, backbone, loaders, "cpu", key=key, show_progress=False
    )
    assert backbone.batches == [4, 4, 1]
    for part, loader in loaders.items():
        alone = training.extract_features(_Recorder(), loader, "cpu", show_progress=False)
        assert torch.equal(feats[part], alone)
        saved = training.load_features(paths[part])
        assert saved.untyped_storage().nbytes() == alone.numel() * alone.element_size()
        again = training.cached_features(
            paths[part], _Recorder(), loader, "cpu", key={**key, "part": part}
        )
        assert torch.equal(again, alone)


def test_feature_parts_compute_only_the_missing_part_and_refuse_a_stale_one(tmp_path):
    loaders, key = _parts(), {"backbone": "b", "images": "split1"}
    paths = {p: tmp_path / f"features_{p}.pt" for p in loaders}
    training.cached_features(
        paths["train"], _Recorder(), loaders["train"], "cpu", key={**key, "part": "train"}
    )
    backbone = _Recorder()
    training.cached_feature_parts(paths, backbone, loaders, "cpu", key=key, show_progress=False)
    assert backbone.batches == [3]  # the test part only: the train part was read back
    paths["test"].unlink()
    backbone = _Recorder()
    torch.save({"epoch": 0}, tmp_path / "frozen_last.pt")  # a model was trained on them
    with pytest.raises(files.StaleRunError, match="split2"):
        training.cached_feature_parts(
            paths, backbone, loaders, "cpu", key={**key, "images": "split2"}, show_progress=False
        )
    assert backbone.batches == [] and not paths["test"].exists()  # refused before computing
    (tmp_path / "frozen_last.pt").unlink()  # no model was: both parts computed again
    training.cached_feature_parts(paths, backbone, loaders, "cpu", key={**key, "images": "split2"},
                                  log=lambda line: None, show_progress=False)  # fmt: skip
    assert backbone.batches == [4, 4, 1]


def test_one_pass_loader_keeps_the_workers_and_refuses_a_shuffled_loader():
    from torch.utils.data import DataLoader

    loaders = _parts(workers=1)
    joint = training.one_pass_loader(list(loaders.values()))
    assert joint.num_workers == 1 and joint.batch_size == 4 and len(joint.dataset) == 9
    got = training.extract_features(_Recorder(), joint, "cpu", show_progress=False)
    assert got.shape == (9, 3)
    shuffled = DataLoader(loaders["train"].dataset, batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="in order"):
        training.one_pass_loader([loaders["test"], shuffled])


def test_kept_memory_is_released_before_workers_fork_only(monkeypatch):
    """A loader with workers forks the process: the memory glibc keeps is handed back first
    (else each kept page the process writes again is copied); without workers, nothing."""
    calls = []
    monkeypatch.setattr(training, "release_freed_memory", lambda: calls.append(1))
    for workers, expected in ((0, []), (1, [1])):
        loader = _parts(workers)["train"]
        training.extract_features(_Recorder(), loader, "cpu", show_progress=False)
        assert calls == expected


def test_feature_parts_fill_each_part_across_batches_and_an_empty_part():
    """Rows go to their part whatever the batches: one that straddles two parts, an empty part,
    and a loader that gives fewer rows than its dataset claims is refused, not padded."""
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.rand(9, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    parts = {"a": x[:5], "empty": x[:0], "b": x[5:]}
    loaders = {k: DataLoader(TensorDataset(v, torch.zeros(len(v))), batch_size=4)
               for k, v in parts.items()}  # fmt: skip
    got = training.extract_feature_parts(_Recorder(), loaders, "cpu", show_progress=False)
    for k, v in parts.items():
        assert torch.equal(got[k], _Recorder()(v).half())

    class Short(TensorDataset):
        def __len__(self):
            return 12  # three rows more than it gives

    short = DataLoader(Short(x, torch.zeros(9)), batch_size=4, sampler=range(9))
    with pytest.raises(ValueError, match="fewer rows"):
        training.extract_features(_Recorder(), short, "cpu", show_progress=False)


def test_the_notebooks_loaders_release_kept_memory_before_each_fork(monkeypatch):
    """make_loader's loaders fork their workers at every pass on a CPU (each epoch, each
    validation): the kept memory is handed back before each fork, never without workers, and
    once for persistent workers (the GPU's), which fork once."""
    from torch.utils.data import TensorDataset

    from cocochallenge import transforms

    calls = []
    monkeypatch.setattr(transforms, "release_freed_memory", lambda: calls.append(1))
    ds = TensorDataset(torch.zeros(4, 2), torch.zeros(4))
    for workers, persistent, expected in ((0, None, 0), (1, None, 2), (1, True, 1)):
        calls.clear()
        loader = transforms.make_loader(ds, 2, False, "cpu", workers, persistent=persistent)
        for _ in range(2):
            assert sum(len(x) for x, _ in loader) == 4
        assert len(calls) == expected, (workers, persistent, calls)
