"""The pre-flight a team runs first on the hub: does the configured run fit the hours left?

    python tools/preflight.py --data-root /home/jovyan/ms-coco \\
        --backbones maxvit_t,convnext_tiny_in22k,regnet_y_16gf_swag --hours-left 3

It measures, on this machine's device and the course data, the images/s of the training loader
alone, of training steps and of forward passes of each backbone (a few dozen batches each, at
most 10 minutes in all; the weights download on the way, for the run to find them), prints the
hours of the configured run and, when they do not fit, what to cut. The numbers come from
``cocochallenge/preflight.py``; this script hands it the course's blocks (``helpers.py``),
which the package never imports. ``tools/gpu_check.py`` is the other check: the CUDA code paths.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    from cocochallenge import budget, config, data, models, preflight

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default="/home/jovyan/ms-coco", help="the unzipped ms-coco")
    p.add_argument("--backbones", required=True, help="comma-separated, as in BACKBONES")
    p.add_argument("--hours-left", type=float, required=True, help="GPU hours the team has")
    p.add_argument("--epochs-finetune", type=int, default=8, help="EPOCHS_FINETUNE (default 8)")
    p.add_argument(
        "--frozen-only",
        default=",".join(config.OPTIONS["frozen_only"]),
        help="the frozen_only option: backbones trained frozen only (default: the library's)",
    )
    p.add_argument("--img-size", type=int, default=0, help="OPTIONS img_size; 0: each own size")
    p.add_argument("--batch-size", type=int, default=64, help="BATCH_SIZE (default 64)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="VAL_FRACTION (default 0.1)")
    p.add_argument("--batches", type=int, default=preflight.BATCHES, help="per measured rate")
    p.add_argument("--minutes", type=float, default=preflight.MINUTES, help="time limit")
    p.add_argument(
        "--course-sizes",
        action="store_true",
        help=f"project the course's sizes {budget.COURSE_SIZES} instead of the folder's counts",
    )
    p.add_argument("--options", default="{}", help="OPTIONS as JSON, e.g. '{\"workers\": 6}'")
    args = p.parse_args(argv)
    split = lambda text: [t.strip() for t in text.split(",") if t.strip()]  # noqa: E731
    import helpers

    try:
        preflight.run(
            args.data_root,
            split(args.backbones),
            args.hours_left,
            helpers,
            epochs_finetune=args.epochs_finetune,
            frozen_only=split(args.frozen_only),
            img_size=args.img_size,
            batch_size=args.batch_size,
            batches=args.batches,
            minutes=args.minutes,
            val_fraction=args.val_fraction,
            course_sizes=args.course_sizes,
            options=json.loads(args.options),
        )
    except (data.DataError, ValueError, models.WeightsUnavailable) as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
