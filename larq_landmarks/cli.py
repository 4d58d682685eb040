"""The ``larq-landmarks`` command."""
import argparse
import sys
from typing import List, Optional


def _demo(args: argparse.Namespace) -> int:
    from larq_landmarks import demo

    demo.run(args.out, steps=args.steps, seed=args.seed)
    return 0


def _convert(args: argparse.Namespace) -> int:
    import os

    import tensorflow as tf

    from larq_landmarks import export

    if not os.path.exists(args.model):
        raise SystemExit(f"larq-landmarks convert: model {args.model!r} not found")
    try:
        model = tf.keras.models.load_model(args.model)
    except Exception as error:  # Keras raises many kinds for a file that is not a model
        raise SystemExit(f"larq-landmarks convert: cannot load model {args.model!r} ({error})")
    flatbuffer = export.convert(
        model, args.output, binary=not args.float, batch_size=None if args.dynamic_batch else 1
    )
    counts = export.op_counts(flatbuffer)
    print(f"wrote {args.output}: {len(flatbuffer):,} bytes, "
          f"{counts.get('LceBconv2d', 0)} LceBconv2d, {counts.get('CONV_2D', 0)} float CONV_2D")
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
    convert = commands.add_parser(
        "convert", help="convert a saved Keras model to a .tflite flatbuffer",
        description="Convert a saved model (its last stack) with Larq Compute Engine to a "
        "bit-packed .tflite, or with --float to a plain float32 TFLite reference.",
    )
    convert.add_argument("model", help="saved Keras model (.keras file or SavedModel folder)")
    convert.add_argument("output", help="the .tflite file to write (atomically)")
    convert.add_argument("--float", action="store_true", help="plain float32 TFLite, no LCE ops")
    convert.add_argument("--dynamic-batch", action="store_true", help="keep the batch size dynamic")
    convert.set_defaults(run=_convert)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
