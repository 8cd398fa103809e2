"""The GPU's code paths, rehearsed on the CPU where torch allows, against the plain path.

Tolerances (measured here on the pretrained Lite0 and demo images, then rounded up): bfloat16
autocast changes probabilities by at most about 0.02 (bfloat16 keeps 8 bits of mantissa);
the stacked flip-TTA batch, torch.compile and the GPU's loader settings change nothing
beyond float32 rounding (1e-5).
"""

import numpy as np
import pytest
import torch

import helpers as h
from cocochallenge import data, models, training, transforms

BF16_ATOL = 0.03
EXACT_ATOL = 1e-5


@pytest.fixture(scope="module")
def lite0(demo_root):
    torch.manual_seed(0)
    model, pre = models.build_model("efficientnet_lite0", pretrained=True, prior=np.full(80, 0.05))
    pre = {**pre, "size": 96}
    ds = h.COCOTrainImageDataset(
        data.data_paths(demo_root)["train_images"],
        data.data_paths(demo_root)["train_labels"],
        max_images=24,
    )
    subset = data.LabelledSubset(ds, np.arange(24), transforms.build_transform(pre))
    return model.eval(), subset, ds


def _probs(model, loader, **kw):
    return training.predict(model, loader, torch.device("cpu"), show_progress=False, **kw)


def test_bfloat16_autocast_runs_the_same_code_path(lite0):
    """The GPU's mixed precision (bfloat16 autocast) through the same calls, on the CPU."""
    from cocochallenge import config

    model, subset, _ = lite0
    assert config.amp_settings(torch.device("cpu"), True) == (None, None)  # off on a CPU
    amp_dtype = torch.bfloat16
    loader = transforms.make_loader(subset, 8, False, "cpu", workers=0)
    plain = _probs(model, loader, tta_flip=True)
    mixed = _probs(model, loader, tta_flip=True, amp_dtype=amp_dtype)
    diff = np.abs(plain["probs_tta"] - mixed["probs_tta"]).max()
    assert 0 < diff < BF16_ATOL, diff  # it did run in bfloat16, and stayed close
    # one training epoch of the course loop under bfloat16 autocast, with a (disabled) scaler
    crit = torch.nn.BCEWithLogitsLoss()
    head_opt = torch.optim.AdamW(model.head.parameters(), lr=1e-4)
    models.freeze_backbone(model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    res = h.train_loop(loader, model, crit, head_opt, "cpu", amp_dtype=amp_dtype, scaler=scaler)
    assert set(res) == {"loss"} and np.isfinite(res["loss"])
    with training.autocast("cpu", amp_dtype):
        val = h.validation_loop(
            loader,
            model,
            crit,
            80,
            "cpu",
            multi_label=True,
            th_multi_label=0.0,
            one_hot=True,
            keep_probs=True,
        )
    assert val["probs"].dtype == np.float32 and np.isfinite(float(val["f1"]))
    after = _probs(model, loader, amp_dtype=amp_dtype)  # the trained head, predicted alike
    np.testing.assert_allclose(val["probs"], after["probs"], atol=1e-6)


def test_stacked_flip_tta_equals_two_calls(lite0):
    model, subset, _ = lite0
    loader = transforms.make_loader(subset, 8, False, "cpu", workers=0)
    a = _probs(model, loader, tta_flip=True, stacked=True)
    model = model.to(memory_format=torch.channels_last)  # as the notebook holds it
    b = _probs(model, loader, tta_flip=True, stacked=False)
    np.testing.assert_allclose(a["probs_tta"], b["probs_tta"], atol=EXACT_ATOL)
    np.testing.assert_allclose(a["probs"], b["probs"], atol=EXACT_ATOL)
    assert not np.allclose(a["probs"], a["probs_tta"], atol=1e-4)  # the mirror did count


def test_gpu_loader_settings_give_the_same_predictions(lite0):
    model, subset, _ = lite0
    plain = transforms.make_loader(subset, 8, False, "cpu", workers=0)
    gpu_like = transforms.make_loader(subset, 8, False, "cpu", workers=2, persistent=True)
    assert gpu_like.persistent_workers and gpu_like.prefetch_factor == 4
    a = _probs(model, plain)
    for _ in range(2):  # persistent workers serve a second pass too
        b = _probs(model, gpu_like)
        np.testing.assert_allclose(a["probs"], b["probs"], atol=EXACT_ATOL)
        np.testing.assert_array_equal(a["targets"], b["targets"])
    del gpu_like


def test_torch_compile_on_a_small_model_matches_eager():
    pytest.importorskip("torch._inductor")
    torch.manual_seed(0)
    head = models.make_head(64, "mlp", hidden=32).eval()
    x = torch.randn(16, 64)
    try:
        compiled = torch.compile(head)
        out = compiled(x)
    except Exception as err:  # no C++ compiler on this machine
        pytest.skip(f"torch.compile unavailable here: {type(err).__name__}: {err}"[:300])
    np.testing.assert_allclose(out.detach().numpy(), head(x).detach().numpy(), atol=EXACT_ATOL)


def test_progress_bar_leaves_no_worker_pool_behind(lite0):
    """tqdm.auto started a second, never-read worker pool per wrapped loader: the forked
    children of later pools then printed "can only test a child process" tracebacks."""
    import gc
    import multiprocessing

    from cocochallenge import config

    _, subset, _ = lite0
    loader = transforms.make_loader(subset, 8, False, "cpu", workers=2)
    pools = []
    for _ in config.progress(loader, True, desc="check", leave=False):
        pools.append(len(multiprocessing.active_children()))
    assert max(pools) == 2, pools  # one pool of 2 workers, not two pools
    gc.collect()
    assert multiprocessing.active_children() == []
