"""Write small synthetic data sets in every real format, in the layout the tutorials and
``scripts/reproduce.py --data-root`` expect.

    python data/make_synthetic.py --out data/synthetic [--train 400] [--test 64]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import larq_landmarks  # noqa: E402,F401
from reproduce import write_small_data  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/synthetic")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_small_data(args.out, args.seed, args.train, args.test)
    print(f"wrote {args.out}: " + ", ".join(sorted(os.listdir(args.out))))


if __name__ == "__main__":
    main()
