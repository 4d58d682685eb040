"""Write small synthetic data sets in every real format, in the layout the tutorials and
``scripts/reproduce.py --data-root`` expect.

    python data/make_synthetic.py --out data/synthetic [--train 400] [--test 64]
"""
import argparse
import os

import larq_landmarks  # noqa: F401
from larq_landmarks.cli import positive_int
from larq_landmarks.datasets import writers


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/synthetic")
    parser.add_argument("--train", type=positive_int, default=400)
    parser.add_argument("--test", type=positive_int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    writers.write_layout(args.out, args.train, args.test, args.seed)
    print(f"wrote {args.out}: " + ", ".join(sorted(os.listdir(args.out))))


if __name__ == "__main__":
    main()
