"""The pre-flight: measured rates of the configured networks, and the hours of the run.

Why: the GPU hours that ``budget`` projects come from another GPU, other software and a
guessed loader. A team on the hub has a few hours and one chance to spend them, so before the
real run it measures, on its own GPU and its own data, what the run is made of: images/s of
the training loader alone, of training steps (the course's ``helpers.train_loop`` with the
notebook's optimiser, mixed precision and moving average) and of forward passes
(``training.predict``), a few dozen batches each. The hours then follow from the same formula
as the projection (:func:`budget.run_seconds`), with these rates instead of the reference ones,
and when they do not fit the time left it says what to cut. ``tools/gpu_check.py`` is another
check: that the CUDA code paths run at all.

The course's blocks (its datasets and ``train_loop``) are handed in as ``course`` by the caller,
``tools/preflight.py``: the package never imports ``helpers.py`` itself.
"""

from __future__ import annotations

import functools
import math
import time

import numpy as np
import pandas as pd
import torch

from . import budget, config, data, models, training, transforms
from .files import SaysWhatToDo

#: batches per measured rate, and the whole pre-flight's time limit
BATCHES = 30
MINUTES = 10.0


class Metered:
    """At most ``batches`` batches of a loader, stopping early at ``deadline``, timed.

    The first batch is not timed: the workers' start-up, cuDNN's autotuning and the first
    allocations are paid once per run, not per image. ``images`` counts the batches after it,
    from the moment the consumer asked for the second one; the caller stops the clock.
    """

    def __init__(self, loader, batches: int, deadline: float):
        self.loader, self.batches, self.deadline = loader, max(2, batches), deadline
        self.images, self.start = 0, None

    def __len__(self):
        return min(self.batches, len(self.loader))

    def __iter__(self):
        self.images, self.start = 0, None
        it = iter(self.loader)
        first = next(it, None)
        if first is None:
            return
        yield first
        self.start = time.perf_counter()
        for i, batch in enumerate(it, start=1):
            if i >= self.batches or (self.images and time.perf_counter() > self.deadline):
                break
            self.images += len(batch[0])
            yield batch

    def rate(self, device: torch.device) -> float:
        """Images/s since the second batch was asked for (after the GPU has finished)."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        if not self.images:
            raise ValueError("too few images to measure a rate: at least two batches are needed")
        return self.images / (time.perf_counter() - self.start)


def _until(deadline: float, share: float) -> float:
    """A deadline ``share`` of the way from now to ``deadline``."""
    now = time.perf_counter()
    return now + share * max(0.0, deadline - now)


def measure(name: str, course, train_set, idx, device, cfg: dict, deadline: float) -> dict:
    """Images/s of ``name``: ``loader`` (training transform, no model), ``train`` (training
    steps with ``course.train_loop``; absent for a frozen-only backbone) and ``forward``
    (``training.predict``), on the images ``idx`` of ``train_set``, done by ``deadline``."""
    rates, notes = {}, []
    try:
        model, _ = models.build_model(name, pretrained=True, dropout=cfg["dropout"])
    except models.WeightsUnavailable as err:  # still measured, but the run itself would stop
        notes.append(str(err).splitlines()[0])
        model, _ = models.build_model(name, pretrained=False, dropout=cfg["dropout"])
    fmt = torch.channels_last if cfg["channels_last"] else torch.preserve_format
    model = model.to(device, memory_format=fmt)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    pre = models.preprocess_for(name, cfg["img_size"])
    batch, workers, amp_dtype = cfg["batch_size"], cfg["workers"], cfg["amp_dtype"]
    train_t = transforms.build_transform(pre, train=True, pad=cfg["pad"], augment=cfg["augment"])
    eval_t = transforms.build_transform(pre, train=False, pad=cfg["pad"])
    train_loader = transforms.make_loader(
        data.LabelledSubset(train_set, idx, train_t), batch, True, device, workers
    )
    eval_loader = transforms.make_loader(
        data.LabelledSubset(train_set, idx, eval_t), 2 * batch, False, device, workers
    )
    metered = Metered(train_loader, cfg["batches"], _until(deadline, 1 / 3))
    for _ in metered:
        pass
    rates["loader"] = metered.rate(device)
    if name not in cfg["frozen_only"]:
        models.unfreeze_backbone(model)
        model.freeze_bn = cfg["freeze_bn"]
        lr = cfg["lr"]
        groups = models.param_groups(model, lr, cfg["backbone_lr_factor"], cfg["weight_decay"])
        optimizer = training.make_optimizer(groups, device, lr)
        scheduler = training.warmup_cosine(optimizer, 10 * cfg["batches"], cfg["batches"])
        ema = training.make_ema(model, cfg["batches"], 1.0) if cfg["ema"] else None
        criterion = torch.nn.BCEWithLogitsLoss()
        metered = Metered(train_loader, cfg["batches"], _until(deadline, 1 / 2))
        extras = dict(scheduler=scheduler, amp_dtype=amp_dtype, scaler=cfg["scaler"], ema=ema)
        course.train_loop(metered, model, criterion, optimizer, device, **extras)
        rates["train"] = metered.rate(device)
        del optimizer, scheduler, ema
    metered = Metered(eval_loader, cfg["batches"], _until(deadline, 1.0))
    training.predict(model, metered, device, amp_dtype=amp_dtype, show_progress=False)
    rates["forward"] = metered.rate(device)
    del model
    peak = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
    return {"rates": rates, "size": pre["size"], "notes": notes, "peak_gb": peak}


def hours_of(measured: dict, sizes: dict, epochs_finetune: int, frozen_only=(), tta=True,
             ema=True, scale: dict | None = None) -> dict:  # fmt: skip
    """``{backbone: hours}`` by :func:`budget.run_seconds` at the measured rates.

    A frozen-only backbone has no training rate and runs no fine-tuning epoch. ``scale``
    (``{backbone: factor}``) multiplies its rates, for "what if" advice such as a smaller
    input (rates scale with the pixel count, as the projection assumes).
    """
    out = {}
    for name, m in measured.items():
        f = (scale or {}).get(name, 1.0)
        rates = {k: v * f for k, v in m["rates"].items()}
        rates.setdefault("train", rates["forward"])  # unused: no fine-tuning epoch
        epochs = budget.finetune_epochs(name, epochs_finetune, frozen_only)
        out[name] = budget.run_seconds(rates, epochs_finetune=epochs, tta=tta, ema=ema, **sizes)
        out[name] /= 3600
    return out


def advice(measured: dict, sizes: dict, cfg: dict, hours_left: float) -> list[str]:
    """What to cut when the run does not fit ``hours_left``: sentences, each with the hours it
    would then take (the same formula, the same measured rates)."""
    epochs, frozen = cfg["epochs_finetune"], list(cfg["frozen_only"])
    base = dict(epochs_finetune=epochs, frozen_only=frozen, ema=cfg["ema"])
    total = lambda **kw: sum(hours_of(measured, sizes, **{**base, **kw}).values())  # noqa: E731
    hours = hours_of(measured, sizes, **base)
    out = []
    tuned = [n for n in measured if n not in frozen]
    if tuned and epochs > 1:
        fits = [e for e in range(epochs - 1, 0, -1) if total(epochs_finetune=e) <= hours_left]
        if fits:
            e = fits[0]
            out.append(
                f"Fewer fine-tuning epochs: EPOCHS_FINETUNE = {e} (instead of {epochs}) takes "
                f"{total(epochs_finetune=e):.2f} h."
            )
    costliest = max(hours, key=hours.get)
    if len(hours) > 1:
        rest = sum(v for n, v in hours.items() if n != costliest)
        out.append(
            f"Drop the costliest backbone, {costliest} ({hours[costliest]:.2f} h): the others "
            f"take {rest:.2f} h."
        )
    costliest_tuned = max(tuned, key=hours.get) if tuned else None
    if costliest_tuned:
        now = [n for n in frozen if n in measured] + [costliest_tuned]
        out.append(
            f"Train {costliest_tuned} frozen only, no fine-tuning (OPTIONS = "
            f'{{"frozen_only": {now}}}): the run takes {total(frozen_only=now):.2f} h.'.replace(
                "'", '"'
            )
        )
    fixed = [n for n in measured if models.BACKBONES[n].get("fixed_size")]
    # the img_size option sets every backbone's size: below the smallest, each one shrinks
    smaller = 32 * math.floor(0.75 * min(m["size"] for m in measured.values()) / 32)
    if fixed:
        out.append(
            f"A smaller input size is not open to {', '.join(fixed)}, which runs at its own "
            "size only."
        )
    elif smaller >= 32:
        scale = {n: (m["size"] / smaller) ** 2 for n, m in measured.items()}
        out.append(
            f'A smaller input: OPTIONS = {{"img_size": {smaller}}} takes about '
            f"{total(scale=scale):.2f} h (rates scaled by the pixel count), at some cost in "
            "accuracy."
        )
    for n, m in measured.items():
        r = m["rates"]
        if "train" in r and "loader" in r and r["loader"] < 1.25 * r["train"]:
            out.append(
                f"{n}'s training is paced by the loader ({r['loader']:.0f} images/s alone, "
                f"{r['train']:.0f} training): more loader workers (OPTIONS workers, at most the "
                "CPU cores) or a smaller input would help it, a faster GPU would not."
            )
    if total(epochs_finetune=0) > hours_left:
        out.append(
            "Even with no fine-tuning at all the run takes "
            f"{total(epochs_finetune=0):.2f} h: keep fewer backbones."
        )
    return out


def sizes_of(data_root, course, val_fraction: float, course_sizes: bool = False) -> tuple:
    """``(sizes, train_set)``: training, validation and test images of the run, and the course's
    training dataset. The data folder's own counts (its labelled images split by
    ``val_fraction``, its test images), or the course's (:data:`budget.COURSE_SIZES`) with
    ``course_sizes`` or where the folder has none."""
    paths = data.check_data_root(data_root)
    train_set = course.COCOTrainImageDataset(paths["train_images"], paths["train_labels"])
    n_test = len(course.COCOTestImageDataset(paths["test_images"]))
    n_val = round(val_fraction * len(train_set))
    sizes = {"n_train": len(train_set) - n_val, "n_val": n_val, "n_test": n_test}
    if course_sizes or not len(train_set):
        sizes = dict(budget.COURSE_SIZES)
    return sizes, train_set


def settings(
    backbones,
    epochs_finetune: int = 8,
    frozen_only=(),
    img_size: int = 0,
    batch_size: int = 64,
    batches: int = BATCHES,
    options: dict | None = None,
) -> dict:
    """What the pre-flight runs with: the library's options (``options`` overriding them as the
    parameters cell's ``OPTIONS`` does), the device and its choices, the notebook's defaults
    for what the parameters cell holds. A backbone that cannot run at ``img_size`` stops here.
    """
    unknown = [n for n in backbones if n not in models.BACKBONES]
    if unknown:
        known = ", ".join(models.BACKBONES)
        raise ValueError(f"unknown backbone(s) {unknown}; choose from {known}")
    opts = {**config.OPTIONS, "img_size": img_size, "frozen_only": list(frozen_only),
            **(options or {})}  # fmt: skip
    device = config.pick_device(opts["device"])
    chosen = config.device_choices(device)
    opts = {k: (chosen[k] if v is None and k in chosen else v) for k, v in opts.items()}
    amp_dtype, scaler = config.amp_settings(device, opts["amp"])
    for name in backbones:
        models.preprocess_for(name, opts["img_size"])
    return {**opts, "device": device, "batch_size": batch_size, "batches": max(2, batches),
            "amp_dtype": amp_dtype, "scaler": scaler, "lr": 3e-4, "backbone_lr_factor": 0.1,
            "augment": "trivial", "ema": True, "epochs_finetune": epochs_finetune}  # fmt: skip


def measure_all(backbones, train_set, cfg: dict, minutes: float = MINUTES, course=None,
                log=print) -> dict:  # fmt: skip
    """``{backbone: measure(...)}`` in ``minutes`` at most, shared between the backbones."""
    device, batches, batch = cfg["device"], cfg["batches"], cfg["batch_size"]
    torch.backends.cudnn.benchmark = True  # as the notebook: the fastest kernels for the sizes
    rng = np.random.default_rng(0)
    n = min(len(train_set), batches * 2 * batch)
    idx = np.sort(rng.choice(len(train_set), size=n, replace=False))
    deadline = time.perf_counter() + 60 * minutes
    measured = {}
    for i, name in enumerate(backbones):
        share = (deadline - time.perf_counter()) / (len(backbones) - i)
        try:
            m = measure(name, course, train_set, idx, device, cfg, time.perf_counter() + share)
        except torch.cuda.OutOfMemoryError as err:
            raise ValueError(
                f"{name} ran out of GPU memory at batch {batch} ({str(err).splitlines()[0]}): "
                "set a smaller BATCH_SIZE (--batch-size here), for example half, and run the "
                "pre-flight again."
            ) from None
        measured[name] = m
        for note in m["notes"]:
            log(f"{name}: {note} (measured with random weights)")
    return measured


def report(measured: dict, sizes: dict, cfg: dict, hours_left: float, log=print) -> dict:
    """Print the measured rates, the hours of the configured run against ``hours_left`` and,
    when it does not fit, :func:`advice`. Returns the numbers it printed."""
    epochs, frozen = cfg["epochs_finetune"], cfg["frozen_only"]
    hours = hours_of(measured, sizes, epochs, frozen, ema=cfg["ema"])
    log(f"measured images/s ({cfg['batches']} batches at most per rate, the first not counted),"
        " and the hours of the run at those rates:")  # fmt: skip
    log(f"{'backbone':26}{'px':>5}{'loader':>9}{'train':>9}{'forward':>9}{'GB':>6}"
        f"{'epochs':>8}{'hours':>8}")  # fmt: skip
    for name, m in measured.items():
        r = m["rates"]
        train = f"{r['train']:9.1f}" if "train" in r else f"{'frozen':>9}"
        gb = f"{m['peak_gb']:6.1f}" if m.get("peak_gb") is not None else f"{'-':>6}"
        log(f"{name:26}{m['size']:>5}{r['loader']:9.1f}{train}{r['forward']:9.1f}{gb}"
            f"{budget.finetune_epochs(name, epochs, frozen):>8}{hours[name]:8.2f}")  # fmt: skip
    total = sum(hours.values())
    fits = total <= hours_left
    log(f"{'the configured run':71}{total:8.2f}")
    tips = []
    if fits:
        log(f"It fits: {total:.2f} h of the {hours_left:.2f} h left, {hours_left - total:.2f} h "
            "to spare for a restart or a second look.")  # fmt: skip
    else:
        log(f"It does not fit: {total:.2f} h against the {hours_left:.2f} h left. What to cut "
            "(each alone, at the same measured rates):")  # fmt: skip
        tips = advice(measured, sizes, cfg, hours_left)
        for tip in tips:
            log(f"- {tip}")
    return {"hours": hours, "total": total, "fits": fits, "advice": tips}


def run(
    data_root,
    backbones,
    hours_left: float,
    course,
    epochs_finetune: int = 8,
    frozen_only=(),
    img_size: int = 0,
    batch_size: int = 64,
    batches: int = BATCHES,
    minutes: float = MINUTES,
    val_fraction: float = 0.1,
    course_sizes: bool = False,
    options: dict | None = None,
    log=print,
) -> dict:
    """The pre-flight: :func:`settings`, the data folder's sizes, :func:`measure_all` and
    :func:`report`. ``course`` holds the course's blocks (``helpers``: the two datasets and
    ``train_loop``). Returns the measured rates, the sizes and what the report printed."""
    t0 = time.perf_counter()
    cfg = settings(backbones, epochs_finetune, frozen_only, img_size, batch_size, batches, options)
    sizes, train_set = sizes_of(data_root, course, val_fraction, course_sizes)
    device = cfg["device"]
    where = (torch.cuda.get_device_name(0) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads")  # fmt: skip
    log(f"pre-flight on {device} ({where}); mixed precision: "
        f"{cfg['amp_dtype'] or 'off (float32)'}; {cfg['workers']} loader workers; batch "
        f"{batch_size}")  # fmt: skip
    frozen = f" (frozen only: {', '.join(frozen_only)})" if frozen_only else ""
    log(f"the run: {sizes['n_train']:,} training, {sizes['n_val']:,} validation, "
        f"{sizes['n_test']:,} test images; {epochs_finetune} fine-tuning epochs"
        f"{frozen}")  # fmt: skip
    measured = measure_all(backbones, train_set, cfg, minutes - (time.perf_counter() - t0) / 60,
                           course, log)  # fmt: skip
    out = report(measured, sizes, cfg, hours_left, log)
    log(f"(the pre-flight took {time.perf_counter() - t0:.0f} s)")
    return {"measured": measured, "sizes": sizes, **out}


# ---- The notebook's plan: the run's hours on this device, before anything trains ---------------
class RunTooLong(SaysWhatToDo, RuntimeError):
    """The configured run would take longer here than the ``max_hours`` option allows."""


@functools.lru_cache(maxsize=1)
def _cpu_speed(probe: str = "efficientnet_lite0", batch: int = 8) -> float:
    """This CPU against the reference GPU: ``probe``'s forward images/s here (random weights,
    two timed batches after a warm-up one) over its reference forward rate. Timed in CPU time
    over the threads torch uses: what the run gets with the cores to itself, whatever else
    the machine is doing while it is timed."""
    model, pre = models.build_model(probe, pretrained=False)
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, pre["size"], pre["size"]).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)
        t0 = time.process_time()
        model(x)
        model(x)
        seconds = (time.process_time() - t0) / torch.get_num_threads()
    return 2 * batch / seconds / (budget.FORWARD_SPEEDUP * budget.REFERENCE_TRAIN_IPS[probe][0])


def rates_here(names, cfg: dict, device, speed: float | None = None) -> dict:
    """``{backbone: {"rates", "size"}}`` on ``device``: the reference GPU rates of
    :mod:`budget` on CUDA; on a CPU the same rates scaled by :func:`_cpu_speed` (``speed``)."""
    out = {}
    for name in names:
        size = models.preprocess_for(name, cfg["img_size"])["size"]
        ref = budget.reference_rates(name, size, cfg["workers"] or 1)
        rates = {"train": ref["train"], "forward": ref["forward"]}
        if device.type != "cuda":
            speed = _cpu_speed() if speed is None else speed
            train = budget.REFERENCE_TRAIN_IPS[name][0] * (budget.REFERENCE_TRAIN_IPS[name][1]
                                                           / size) ** 2 * speed  # fmt: skip
            rates = {"train": train, "forward": budget.FORWARD_SPEEDUP * train}
        out[name] = {"rates": rates, "size": size}
    return out


def plan(names, cfg: dict, device, sizes: dict, speed: float | None = None) -> pd.DataFrame:
    """The configured run's hours on ``device``, per backbone (a table): its input size, the
    fine-tuning epochs it runs, its hours, and where its rates come from."""
    here = rates_here(names, cfg, device, speed)
    hours = hours_of(here, sizes, cfg["epochs_finetune"], cfg["frozen_only"])
    cuda = device.type == "cuda"
    source = "reference GPU rates" if cuda else "EfficientNet-Lite0 timed on this CPU, scaled"
    return pd.DataFrame({
        "px": {n: m["size"] for n, m in here.items()},
        "fine-tuning epochs": {n: budget.finetune_epochs(n, cfg["epochs_finetune"],
                                                         cfg["frozen_only"]) for n in names},
        "hours": hours,
        "rates from": {n: source for n in names},
    })  # fmt: skip


def check(table: pd.DataFrame, cfg: dict, device, sizes: dict) -> str:
    """Go, or stop before anything trains with what to paste into the parameters cell.

    Stops (:class:`RunTooLong`) when the run's hours exceed the ``max_hours`` option: on a CPU
    with the CPU settings (``config.CPU_SETTINGS``, and ``max_images`` when even they do not fit
    these images), on a GPU with what to cut. Then every backbone's weights are fetched (once,
    into their cache): weights that cannot be had stop the run too
    (:class:`models.WeightsUnavailable`), on a CPU again with the CPU settings.
    """
    total, limit = float(table["hours"].sum()), float(cfg["max_hours"])
    cpu = device.type != "cuda"
    where = "this CPU" if cpu else "this GPU"
    if total > limit:
        how = table["rates from"].iloc[0]
        head = (f"The configured run needs about {total:.1f} h on {where} ({how}), over the "
                f"{limit:g} h of the max_hours option.")  # fmt: skip
        if cpu:
            raise RunTooLong(f"{head}\n{_cpu_advice(cfg, sizes, limit)}")
        tips = "\n".join(f"- {t}" for t in advice(
            {n: {"rates": rates_here([n], cfg, device)[n]["rates"], "size": r["px"]}
             for n, r in table.iterrows()}, sizes, {**cfg, "ema": True}, limit))  # fmt: skip
        raise RunTooLong(f"{head} What to cut, each alone:\n{tips}\nOr raise it: OPTIONS = "
                         f'{{"max_hours": {total + 1:.0f}}}.')  # fmt: skip
    for name in table.index:
        try:
            models.fetch_weights(name)
        except models.WeightsUnavailable as err:
            if not cpu:
                raise
            raise models.WeightsUnavailable(
                f"{str(err).splitlines()[0]}\n{_cpu_advice(cfg, sizes, limit)}"
            ) from None
    return f"go: about {total:.2f} h on {where}, within the {limit:g} h of the max_hours option."


def _cpu_advice(cfg: dict, sizes: dict, limit: float) -> str:
    """The CPU settings to paste, with their hours here (and ``max_images`` when needed)."""
    cpu = config.CPU_SETTINGS
    n = sizes["n_train"] + sizes["n_val"]
    n_val = round(cpu["VAL_FRACTION"] * n)
    alt = {**cfg, "epochs_finetune": cpu["EPOCHS_FINETUNE"], "frozen_only": []}
    cpu_sizes = {**sizes, "n_train": n - n_val, "n_val": n_val}
    hours = float(plan(cpu["BACKBONES"], alt, torch.device("cpu"), cpu_sizes)["hours"].sum())
    lines = config.cpu_lines()
    if hours > limit:
        keep = int(n * limit / hours)
        lines += f'\nOPTIONS = {{"max_images": {keep}}}'
        hours = limit
    return (
        f"These settings fit a CPU, about {hours:.1f} h here; paste them into the "
        f"parameters cell (a GPU runs the configured networks):\n{lines}"
    )
