"""Command line: ``python -m cocochallenge {demo-data, validate, handin, score, hours} ...``."""

from __future__ import annotations

import argparse
import sys

from .config import OPTIONS
from .demo import make_demo_data
from .submission import SubmissionError, read_submission, score_submission, validate_submission


def main(argv=None) -> int:
    """Small command-line front end for the jobs a team runs outside the notebooks."""
    parser = argparse.ArgumentParser(
        prog="python -m cocochallenge", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo-data", help="write a demo dataset in the challenge layout")
    p.add_argument("--root", default="data/demo/ms-coco")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("validate", help="check a submission JSON against the test image folder")
    p.add_argument("submission")
    p.add_argument("test_dir", help="the images/test-resized folder")
    p = sub.add_parser("handin", help="check a run folder and pack it into a zip for Moodle")
    p.add_argument("run_dir")
    p.add_argument("--out", help="zip path (default: <run_dir>/handin.zip)")
    p.add_argument(
        "--max-mb", type=float, default=20.0, help="the course's upload limit, MB (default 20)"
    )
    p.add_argument("--test-dir", help="the images/test-resized folder, if the run does not say")
    p = sub.add_parser("score", help="score a submission JSON against an answers JSON")
    p.add_argument("submission")
    p.add_argument("answers")
    p = sub.add_parser("hours", help="projected GPU hours of backbones on the course data")
    p.add_argument("backbones", nargs="+")
    p.add_argument("--epochs-finetune", type=int, default=8)
    p.add_argument("--img-size", type=int, default=0, help="0: each weights' own size")
    p.add_argument(
        "--frozen-only",
        default=",".join(OPTIONS["frozen_only"]),
        help="backbones trained frozen only, a,b (default: the frozen_only option's)",
    )
    args = parser.parse_args(argv)
    if args.command == "hours":
        from .budget import finetune_epochs, projected_hours, reference_rates
        from .models import preprocess_for

        size = lambda name: preprocess_for(name, args.img_size)["size"]  # noqa: E731
        frozen = [n.strip() for n in args.frozen_only.split(",") if n.strip()]
        hours = projected_hours(args.backbones, size, args.epochs_finetune, frozen_only=frozen)
        print(f"{'backbone':26}{'px':>5}{'paced by':>10}{'epochs':>8}{'hours':>8}  (projected, "
              "not measured: tools/preflight.py measures)")  # fmt: skip
        for name, value in hours.items():
            bound = reference_rates(name, size(name))["bound"]
            epochs = finetune_epochs(name, args.epochs_finetune, frozen)
            print(f"{name:26}{size(name):>5}{bound:>10}{epochs:>8}{value:>8.2f}")
        print(f"{'total':49}{sum(hours.values()):>8.2f}")
        return 0
    if args.command == "demo-data":
        out = make_demo_data(args.root, args.n_train, args.n_test, args.seed)
        counts = out["class_counts"]
        print(
            f"demo data in {out['root']}: {out['n_train']} train, {out['n_test']} test images, "
            f"{sum(counts) / out['n_train']:.2f} labels per image, class 0 in {counts[0]} images, "
            f"rarest class in {min(counts)}; {out['seconds']:.1f}s"
        )
    elif args.command == "handin":
        from .handin import pack

        return 0 if pack(args.run_dir, args.out, args.max_mb, test_dir=args.test_dir) else 1
    elif args.command == "validate":
        try:
            validate_submission(read_submission(args.submission), args.test_dir)
        except SubmissionError as err:
            print(err, file=sys.stderr)
            return 1
        print(f"{args.submission}: valid")
    else:
        try:
            scores = score_submission(args.submission, args.answers)
        except SubmissionError as err:
            print(err, file=sys.stderr)
            return 1
        for key, value in scores.items():
            print(f"{key:>16}: {value:.4f}" if isinstance(value, float) else f"{key:>16}: {value}")
    return 0
