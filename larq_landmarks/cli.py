"""The ``larq-landmarks`` command."""
import argparse
import sys
from typing import List, Optional


def _demo(args: argparse.Namespace) -> int:
    from larq_landmarks import demo

    demo.run(args.out, steps=args.steps, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="larq-landmarks", description="Binarized landmark localizers (Larq / LCE)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="the main job end to end on built-in synthetic data",
        description="Write a synthetic 300W-format data set, train a small binary model on it, "
        "evaluate it, convert it with LCE, and write a report with pictures.",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
