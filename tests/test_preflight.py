"""The pre-flight and the frozen-only projection: hours that follow from the rates, advice
when they do not fit the time left, no fine-tuning counted for a backbone trained frozen."""

import re
from pathlib import Path

import pytest

from cocochallenge import budget, cli, models, preflight

ROOT = Path(__file__).resolve().parents[1]
#: a row of the printed table: backbone, px, loader, train (or "frozen"), forward, GB, epochs, hours
ROW = re.compile(
    r"^(\w+) +(\d+) +([\d.]+) +([\d.]+|frozen) +([\d.]+) +([\d.]+|-) +(\d+) +([\d.]+)$"
)


def _size(name):
    return models.preprocess_for(name)["size"]


@pytest.mark.quick
def test_a_frozen_only_backbone_is_projected_without_fine_tuning(capsys):
    """``frozen_only`` removes the fine-tuning epochs from that backbone's hours, and from no
    other; the command line prints the same figures."""
    names = ["maxvit_t", "regnet_y_16gf_swag"]
    tuned = budget.projected_hours(names, _size, epochs_finetune=8)
    frozen = budget.projected_hours(names, _size, 8, frozen_only=["regnet_y_16gf_swag"])
    assert frozen["maxvit_t"] == tuned["maxvit_t"]
    zero = budget.projected_hours(["regnet_y_16gf_swag"], _size, epochs_finetune=0)
    assert frozen["regnet_y_16gf_swag"] == zero["regnet_y_16gf_swag"] < tuned["regnet_y_16gf_swag"]
    argv = ["hours", *names, "--frozen-only", "regnet_y_16gf_swag"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for name in names:
        row = out.split(name)[1].splitlines()[0].split()
        epochs = 0 if name == "regnet_y_16gf_swag" else 8
        assert row[-2:] == [str(epochs), f"{frozen[name]:.2f}"], row
    assert out.splitlines()[-1].split()[-1] == f"{sum(frozen.values()):.2f}"


def _measured(**rates):
    """A measured dict as :func:`preflight.measure_all` returns it, from ``name=(size, rates)``."""
    return {n: {"rates": r, "size": s, "notes": [], "peak_gb": None} for n, (s, r) in rates.items()}


CFG = {"epochs_finetune": 8, "frozen_only": [], "tta": True, "ema": True, "batches": 30}


@pytest.mark.quick
def test_the_report_says_what_to_cut_and_each_cut_adds_up():
    """Two backbones measured (one slow, one paced by its loader): with hours to spare the run
    fits and nothing is advised; with too few, each advice names the setting and the hours the
    same formula gives with it."""
    m = _measured(
        convnext_tiny=(224, {"loader": 2000.0, "train": 300.0, "forward": 900.0}),
        mobilenet_v3_large=(224, {"loader": 1000.0, "train": 950.0, "forward": 1000.0}),
    )
    sizes, lines = dict(budget.COURSE_SIZES), []
    hours = preflight.hours_of(m, sizes, 8)
    for name, mm in m.items():  # the formula, at the measured rates
        expected = budget.run_seconds(mm["rates"], epochs_finetune=8, **sizes) / 3600
        assert hours[name] == pytest.approx(expected)
    total = sum(hours.values())
    out = preflight.report(m, sizes, CFG, hours_left=total + 1, log=lines.append)
    assert out["fits"] and not out["advice"] and "It fits" in lines[-1]
    lines.clear()
    out = preflight.report(m, sizes, CFG, hours_left=0.75 * total, log=lines.append)
    assert not out["fits"] and "It does not fit" in "\n".join(lines)
    tips = {t.split(":")[0].split(",")[0]: t for t in out["advice"]}
    epochs = int(re.search(r"EPOCHS_FINETUNE = (\d+)", tips["Fewer fine-tuning epochs"])[1])
    fewer = sum(preflight.hours_of(m, sizes, epochs).values())
    more = sum(preflight.hours_of(m, sizes, epochs + 1).values())
    assert fewer <= 0.75 * total < more  # the most epochs that fit
    assert f"{fewer:.2f} h" in tips["Fewer fine-tuning epochs"]
    drop = tips["Drop the costliest backbone"]
    assert "convnext_tiny" in drop and f"{hours['mobilenet_v3_large']:.2f} h" in drop
    freeze = tips["Train convnext_tiny frozen only"]
    frozen = sum(preflight.hours_of(m, sizes, 8, ["convnext_tiny"]).values())
    assert '{"frozen_only": ["convnext_tiny"]}' in freeze and f"{frozen:.2f} h" in freeze
    smaller = sum(preflight.hours_of(m, sizes, 8, scale={n: (224 / 160) ** 2 for n in m}).values())
    assert (
        '"img_size": 160' in tips["A smaller input"]
        and f"{smaller:.2f} h" in tips["A smaller input"]
    )
    assert any(
        t.startswith("mobilenet_v3_large's training is paced by the loader") for t in tips.values()
    )
    assert not any(t.startswith("convnext_tiny's training is paced") for t in tips.values())
    assert lines[-len(out["advice"]) :] == [f"- {t}" for t in out["advice"]]  # all printed


@pytest.mark.quick
def test_no_smaller_input_is_advised_to_maxvit():
    """MaxViT runs at 224 px only: the advice says so instead of an img_size it would refuse."""
    m = _measured(maxvit_t=(224, {"loader": 900.0, "train": 100.0, "forward": 300.0}))
    tips = preflight.advice(m, dict(budget.COURSE_SIZES), CFG, hours_left=0.01)
    assert not any("img_size" in t for t in tips)
    assert any("not open to maxvit_t" in t for t in tips)
    assert any(t.startswith("Even with no fine-tuning at all") for t in tips)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from cocochallenge.demo import make_demo_data

    root = tmp_path_factory.mktemp("preflight") / "ms-coco"
    make_demo_data(root, n_train=40, n_test=6, seed=0, progress=False)
    return root


def test_the_preflight_command_measures_and_projects(demo_root, capsys):
    """``tools/preflight.py`` on generated data, the offline Lite0 at 64 px on this CPU,
    projected to the course's sizes: each printed hour follows from the printed rates by
    ``budget.run_seconds``, the total is their sum, and with too few hours left the advice
    follows. The folder's own counts are used without ``--course-sizes``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("preflight_tool", ROOT / "tools/preflight.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = ["--data-root", str(demo_root), "--backbones", "efficientnet_lite0", "--img-size",
            "64", "--batch-size", "8", "--batches", "3", "--hours-left", "0.5",
            "--course-sizes", "--options", '{"workers": 0}']  # fmt: skip
    assert tool.main(argv) == 0
    out = capsys.readouterr().out
    rows = [ROW.match(line.strip()) for line in out.splitlines()]
    rows = [r for r in rows if r]
    assert [r[1] for r in rows] == ["efficientnet_lite0"], out
    name, size, loader, train, forward, _, epochs, hours = rows[0].groups()
    assert (int(size), int(epochs)) == (64, 8)
    rates = {"loader": float(loader), "train": float(train), "forward": float(forward)}
    at = lambda d: budget.run_seconds({k: v + d for k, v in rates.items()}, epochs_finetune=8,
                                      **budget.COURSE_SIZES) / 3600  # fmt: skip
    expected = at(0)
    assert at(0.05) - 0.005 <= float(hours) <= at(-0.05) + 0.005  # the rates printed to 0.1
    total = next(line for line in out.splitlines() if line.startswith("the configured run"))
    assert total.split()[-1] == hours
    if expected > 0.5:  # a CPU at 64 px: hours of the course's 65,000 images
        assert "It does not fit" in out and "\n- " in out
    assert "the run: 58,000 training, 6,500 validation, 4,952 test images" in out
    # without --course-sizes: the folder's own 40 labelled images, 10% for validation
    sizes, train_set = preflight.sizes_of(demo_root, _course(), 0.1)
    assert sizes == {"n_train": 36, "n_val": 4, "n_test": 6} and len(train_set) == 40


def _course():
    import helpers

    return helpers


def test_the_preflight_refuses_what_the_run_would_refuse(demo_root):
    """An unknown backbone or an input size MaxViT cannot take: stopped before measuring."""
    with pytest.raises(ValueError, match="unknown backbone"):
        preflight.run(demo_root, ["no_such_net"], 1.0, _course())
    with pytest.raises(ValueError, match="224 px only"):
        preflight.run(demo_root, ["maxvit_t"], 1.0, _course(), img_size=160)


def _plan_cfg(**changes):
    """The settings the notebook's plan reads, as its defaults set them (not the tests' own)."""
    from cocochallenge import config

    cfg = {**config.OPTIONS, "workers": 8, "backbones": ["maxvit_t"], "epochs_finetune": 8}
    return {**cfg, **changes}


SIZES = {"n_train": 542, "n_val": 136, "n_test": 32}


@pytest.mark.quick
def test_on_a_cpu_a_run_over_max_hours_stops_with_the_cpu_settings_to_paste(monkeypatch):
    """The notebook's plan on a CPU (its speed given, as _cpu_speed would measure it): the
    default networks take far more than max_hours, and the stop holds config.CPU_SETTINGS
    as lines to paste (the block of the README and the first cell), short, no weights asked."""
    import torch

    from cocochallenge import config

    monkeypatch.setattr(preflight, "_cpu_speed", lambda: 0.01)
    monkeypatch.setattr(models, "fetch_weights", lambda name: pytest.fail("fetched weights"))
    cfg = _plan_cfg(backbones=["maxvit_t", "regnet_y_16gf_swag"])
    cpu = torch.device("cpu")
    table = preflight.plan(cfg["backbones"], cfg, cpu, SIZES)
    assert table["fine-tuning epochs"].to_dict() == {"maxvit_t": 8, "regnet_y_16gf_swag": 0}
    with pytest.raises(preflight.RunTooLong) as err:
        preflight.check(table, {**cfg, "max_hours": table["hours"].sum() / 2}, cpu, SIZES)
    text = str(err.value)
    assert config.cpu_lines() in text and len(text.splitlines()) <= 15
    assert "max_images" not in text  # the CPU settings fit these 678 photos
    assert text.startswith(f"The configured run needs about {table['hours'].sum():.1f} h")
    # the same run within the limit goes on, and asks for the weights
    monkeypatch.setattr(models, "fetch_weights", lambda name: None)
    assert preflight.check(table, {**cfg, "max_hours": 1e9}, cpu, SIZES).startswith("go:")


@pytest.mark.quick
def test_on_a_cpu_the_cpu_settings_shrink_to_the_images_that_fit(monkeypatch):
    import torch

    monkeypatch.setattr(preflight, "_cpu_speed", lambda: 0.01)
    course = {"n_train": 58_500, "n_val": 6_500, "n_test": 4_952}
    cfg = _plan_cfg(max_hours=1.0)
    table = preflight.plan(["maxvit_t"], cfg, torch.device("cpu"), course)
    with pytest.raises(preflight.RunTooLong, match=r'OPTIONS = \{"max_images": \d+\}') as err:
        preflight.check(table, cfg, torch.device("cpu"), course)
    keep = int(re.search(r'"max_images": (\d+)', str(err.value)).group(1))
    assert 0 < keep < 65_000


@pytest.mark.quick
def test_weights_that_cannot_be_had_stop_with_the_cpu_settings_on_a_cpu_only(monkeypatch):
    import torch

    from cocochallenge import config

    def offline(name):
        raise models.WeightsUnavailable(f"The pretrained weights of {name} could not be loaded")

    monkeypatch.setattr(preflight, "_cpu_speed", lambda: 1.0)
    monkeypatch.setattr(models, "fetch_weights", offline)
    cfg = _plan_cfg()
    for device, with_block in ((torch.device("cpu"), True), (torch.device("cuda"), False)):
        table = preflight.plan(["maxvit_t"], cfg, device, SIZES)
        with pytest.raises(models.WeightsUnavailable) as err:
            preflight.check(table, cfg, device, SIZES)
        assert (config.cpu_lines() in str(err.value)) == with_block


@pytest.mark.quick
def test_on_a_gpu_a_run_over_max_hours_says_what_to_cut():
    import torch

    cfg = _plan_cfg(backbones=["maxvit_t", "convnext_tiny_in22k"])
    course = {"n_train": 58_500, "n_val": 6_500, "n_test": 4_952}
    gpu = torch.device("cuda")
    table = preflight.plan(cfg["backbones"], cfg, gpu, course)
    assert table["rates from"].eq("reference GPU rates").all()
    with pytest.raises(preflight.RunTooLong) as err:
        preflight.check(table, {**cfg, "max_hours": 0.3}, gpu, course)
    text = str(err.value)
    assert "What to cut" in text and "EPOCHS_FINETUNE = " in text and "max_hours" in text
