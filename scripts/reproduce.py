"""The papers' experiments, one command each, at full scale or small scale (``--small``).

    python scripts/reproduce.py pooling --data-root /data --out results/        # real data, GPU
    python scripts/reproduce.py pooling --small --out results/small             # synthetic, CPU
    python scripts/reproduce.py all --small --out results/small

Experiments: ``pooling`` (supplementary Table 1), ``relu`` (Table 2), ``blocks`` (binary HPM vs
binary bottleneck vs real bottleneck vs real HPM at similar parameter count), ``aflw2000``
(300W-LP -> AFLW2000-3D NME by yaw, Table 5), ``pifa`` (AFLW-PIFA visible / all, Tables 3-4),
``mpii`` (MPII PCKh), ``segmentation`` (facial parts on 300W, Table 6); ``recipe`` (issue 12's
ablation of training recipes for the binary HPM net against its real-valued twin, on the MPII and
300W formats, ``--seeds`` seeds each).

``--data-root`` layout (what the readers expect; ``--small`` writes synthetic data like it)::

    300W_LP/            images + .mat             AFLW2000/      images + .mat
    AFLW_PIFA/train/    images + .mat             AFLW_PIFA/test/
    300W/train/         images + .pts             300W/test/
    mpii/train.json     mpii/valid.json           mpii/images/

Each experiment writes ``<out>/<experiment>.md`` and ``.json``: the paper's table layout, our
numbers next to the paper's.
"""
import argparse
import json
import os
import time

import larq_landmarks  # noqa: F401  (first: Keras 2 set-up)
import tensorflow as tf

from larq_landmarks import evaluation, layouts, models, training
from larq_landmarks.atomic import atomic_path
from larq_landmarks.cli import DTYPE_POLICIES, positive_int
from larq_landmarks.datasets import formats, pipeline, writers
from larq_landmarks.distillation import Distiller

NOT_GIVEN = "not in METHOD.md"
EXPERIMENTS = {
    "pooling": {
        "title": "Supplementary Table 1: max vs average pooling (MPII PCKh@0.5, %)",
        "train": ("mpii-json", "mpii/train.json"), "test": ("mpii-json", "mpii/valid.json"),
        "configs": ["binary_hpm", "binary_hpm_avgpool"],
        "paper": {"binary_hpm": {"Mean": 76.0}, "binary_hpm_avgpool": {"Mean": 71.9}},
        "higher_is_better": True, "key": ("PCKh@0.5 %", "Mean"),
    },
    "relu": {
        "title": "Supplementary Table 2: ReLU after each convolution (MPII PCKh@0.5, %)",
        "train": ("mpii-json", "mpii/train.json"), "test": ("mpii-json", "mpii/valid.json"),
        "configs": ["binary_hpm", "binary_hpm_relu"],
        "paper": {"binary_hpm": {"Mean": 76.0}, "binary_hpm_relu": {"Mean": 77.8}},
        "higher_is_better": True, "key": ("PCKh@0.5 %", "Mean"),
    },
    "blocks": {
        "title": "Block comparison at similar parameter count (MPII PCKh@0.5, %)",
        "train": ("mpii-json", "mpii/train.json"), "test": ("mpii-json", "mpii/valid.json"),
        "configs": ["binary_hpm", "binary_bottleneck_matched", "real_bottleneck_matched", "real_hpm"],
        "paper": {"binary_hpm": {"Mean": 76.0}},
        "higher_is_better": True, "key": ("PCKh@0.5 %", "Mean"),
    },
    "aflw2000": {
        "title": "Supplementary Table 5: AFLW2000-3D NME (%, box-normalised) by |yaw|, trained on 300W-LP",
        "train": ("300w-lp", "300W_LP"), "test": ("aflw2000", "AFLW2000"),
        "configs": ["binary_hpm"],
        "paper": {"binary_hpm": {"[0,30]": 2.47, "[30,60]": 3.01, "[60,90]": 4.31, "mean": 3.26}},
        "higher_is_better": False, "key": ("NME box % by |yaw| (AFLW2000-3D layout)", "mean"),
    },
    "pifa": {
        "title": "Tables 3-4: AFLW-PIFA NME (%, box-normalised), visible points and all 34",
        "train": ("aflw-pifa", "AFLW_PIFA/train"), "test": ("aflw-pifa", "AFLW_PIFA/test"),
        "configs": ["binary_hpm"],
        "paper": {"binary_hpm": {"NME box, visible points %": 3.02, "NME box %": 4.47}},
        "higher_is_better": False, "key": ("NME", "NME box, visible points %"),
    },
    "mpii": {
        "title": "MPII PCKh@0.5 (%) of the binary HPM network (ICCV supp.: 76.0, 77.8 with ReLU; TPAMI: 81.3)",
        "train": ("mpii-json", "mpii/train.json"), "test": ("mpii-json", "mpii/valid.json"),
        "configs": ["binary_hpm"],
        "paper": {"binary_hpm": {"Mean": 76.0}},
        "higher_is_better": True, "key": ("PCKh@0.5 %", "Mean"),
    },
    "segmentation": {
        "title": "Supplementary Table 6: facial part segmentation on 300W (%)",
        "train": ("300w", "300W/train"), "test": ("300w", "300W/test"), "task": "segmentation",
        "configs": ["real_bottleneck", "binary_bottleneck", "binary_hpm"],
        "paper": {
            "real_bottleneck": {"pixel_accuracy": 97.98, "mean_accuracy": 77.23, "mean_iu": 69.29},
            "binary_bottleneck": {"pixel_accuracy": 97.41, "mean_accuracy": 70.35, "mean_iu": 62.49},
            "binary_hpm": {"pixel_accuracy": 97.91, "mean_accuracy": 76.02, "mean_iu": 68.05},
        },
        "higher_is_better": True, "key": ("Part segmentation %", "mean_iu"),
    },
}

FULL = {"input_size": 256, "overrides": {}, "batch_size": 10, "learning_rate": 2.5e-4, "sigma": 1.5}
# --small: peak rate 5e-3 (2e-3 until 2026-11-29: 2.5x trains both the binary and the real networks
# better at this budget, reproduce.py recipe)
SMALL = {"input_size": 64, "overrides": {"width": 64, "depth": 2}, "batch_size": 16,
         "learning_rate": 5e-3, "sigma": 1.5}


# Issue 12: training recipes: compile options; two-stage training (the first half of the steps
# with binary weights and real activations, WEIGHTS_FIRST, or binary activations and real weights,
# ACTIVATIONS_FIRST; then the fully binary net from those weights); distillation from a real twin
# trained on the same data and seed (the teacher recipe named).
# name -> (named configuration, compile options, two-stage first stage or None, teacher recipe or
# None[, model options])
# rate_factor scales the run's peak rate: the first rows were measured at 2e-3 with --small (0.4x
# today's 5e-3), the "2.5x rate" rows at 5e-3. first_fraction is stage one's share of the epochs
# (training.two_stage): the rows before the "first_fraction 0.3" one were measured with half.
PAPERS = {"optimizer": "rmsprop", "schedule": "step", "rate_factor": 0.4, "first_fraction": 0.5}
ADAM_STEP = {"optimizer": "adam", "schedule": "step", "rate_factor": 0.4, "first_fraction": 0.5}
ADAM_COSINE = {"optimizer": "adam", "schedule": "cosine", "warmup_fraction": 0.05, "rate_factor": 0.4,
               "first_fraction": 0.5}
ADAM_STEP_FAST = {"optimizer": "adam", "schedule": "step", "first_fraction": 0.5}
ADAM_STEP_FAST_SHORT_FIRST = {**ADAM_STEP_FAST, "first_fraction": 0.3}
WEIGHTS_FIRST, ACTIVATIONS_FIRST = "binary_weights", "binary_activations"  # two stages: what stage one binarizes
STE = {"input_quantizer": "ste_sign"}  # the papers' sign gradient (the rows measured before the default changed)
APPROX = {"input_quantizer": "approx_sign"}
RECIPES = {
    "binary, papers' recipe (RMSprop, step decay)": ("binary_hpm", PAPERS, None, None, STE),
    "binary, Adam, step decay": ("binary_hpm", ADAM_STEP, None, None, STE),
    "binary, Adam, warm-up + cosine": ("binary_hpm", ADAM_COSINE, None, None, STE),
    "binary, Adam, warm-up + cosine, two-stage": ("binary_hpm", ADAM_COSINE, WEIGHTS_FIRST, None, STE),
    "binary, Adam, step decay, two-stage": ("binary_hpm", ADAM_STEP, WEIGHTS_FIRST, None, STE),
    "binary, Adam, step decay, distilled": ("binary_hpm", ADAM_STEP, None, "real twin, Adam, step decay", STE),
    "binary, Adam, step decay, two-stage, ApproxSign gradient": ("binary_hpm", ADAM_STEP, WEIGHTS_FIRST, None, APPROX),
    "binary, Adam, step decay, two-stage, SwishSign gradient": ("binary_hpm", ADAM_STEP, WEIGHTS_FIRST, None,
                                                                {"input_quantizer": "swish_sign"}),
    "binary, Adam, step decay 2.5x rate, two-stage, ApproxSign gradient": (
        "binary_hpm", ADAM_STEP_FAST, WEIGHTS_FIRST, None, APPROX),
    "binary, Adam, step decay 2.5x rate, two-stage activations first, ApproxSign gradient": (
        "binary_hpm", ADAM_STEP_FAST, ACTIVATIONS_FIRST, None, APPROX),
    "binary, Adam, step decay 2.5x rate, two-stage activations first, first_fraction 0.3, ApproxSign gradient": (
        "binary_hpm", ADAM_STEP_FAST_SHORT_FIRST, ACTIVATIONS_FIRST, None, APPROX),
    "real twin, papers' recipe": ("real_hpm", PAPERS, None, None),
    "real twin, Adam, step decay": ("real_hpm", ADAM_STEP, None, None),
    "real twin, Adam, warm-up + cosine": ("real_hpm", ADAM_COSINE, None, None),
    "real twin, Adam, step decay 2.5x rate": ("real_hpm", ADAM_STEP_FAST, None, None),
}
RECIPE_BENCHMARKS = {
    "MPII format, PCKh@0.5 Mean %": {"train": ("mpii-json", "mpii/train.json"), "test": ("mpii-json", "mpii/valid.json"),
                                     "key": ("PCKh@0.5 %", "Mean"), "higher_is_better": True},
    "300W format, NME inter-ocular %": {"train": ("300w", "300W/train"), "test": ("300w", "300W/test"),
                                        "key": ("NME", "NME inter-ocular %"), "higher_is_better": False},
}


def run_config(name, spec, root, settings, steps, epochs, seed, compile_options=None, two_stage=None,
               teacher=None, keep_model=False, model_options=None):
    """Train one named configuration and evaluate it; returns its tables and timings.
    ``model_options`` override the configuration's model arguments (e.g. ``input_quantizer``);
    ``compile_options`` go to :func:`training.compile_model` (default: its default recipe);
    ``two_stage`` (None: one stage) names what the first stage of :func:`training.two_stage`
    binarizes (``"binary_weights"`` or ``"binary_activations"``); ``teacher``
    distils a trained real-valued twin into it (:class:`Distiller`); ``keep_model`` adds the
    trained model under ``"model"``."""
    task = spec.get("task", "heatmaps")
    (train_format, train_path), (test_format, test_path) = spec["train"], spec["test"]
    fmt = formats.get_format(train_format)
    images = os.path.join(root, "mpii", "images") if fmt.needs_images else None
    train_columns = formats.read_columns(train_format, os.path.join(root, train_path), images)
    test_columns = formats.read_columns(test_format, os.path.join(root, test_path), images)
    outputs = 7 if task == "segmentation" else fmt.num_points
    tf.keras.utils.set_random_seed(seed)
    steps_per_epoch = steps or max(1, len(train_columns["scale"]) // settings["batch_size"])
    compile_options = compile_options or {}

    def build(**stage):
        with models.dtype_policy(settings.get("dtype_policy", "float32")):  # --dtype-policy
            return models.build_named(name, outputs, input_size=settings["input_size"], task=task,
                                      **{**settings["overrides"], **(model_options or {}), **stage})

    def train(network, stage_epochs):
        trainee = network if teacher is None else Distiller(network, teacher)
        options = dict(compile_options)
        options.pop("first_fraction", None)
        rate = settings["learning_rate"] * options.pop("rate_factor", 1.0)
        training.compile_model(trainee, task, steps_per_epoch, stage_epochs, rate, **options)
        trainee.fit(training.for_stacks(data, network), epochs=stage_epochs, steps_per_epoch=steps_per_epoch,
                    verbose=2)

    options = dict(flip_permutation=layouts.flip_permutation(fmt.num_points), seed=seed,
                   batch_size=settings["batch_size"])
    if task == "segmentation":
        data = pipeline.segmentation_dataset(train_columns, settings["input_size"], **options)
    else:
        data = pipeline.landmark_dataset(train_columns, settings["input_size"], sigma=settings["sigma"], **options)
    started = time.time()
    if two_stage and epochs >= 2:  # one stage per epoch at least
        model = training.two_stage(build, train, epochs, first=two_stage,
                                   first_fraction=compile_options.get("first_fraction", training.DEFAULT_FIRST_FRACTION))
    else:
        model = build()
        train(model, epochs)
    train_seconds = time.time() - started
    predict = lambda x: model.predict_on_batch(x)  # noqa: E731
    if task == "segmentation":
        result = evaluation.evaluate_segmentation(predict, test_columns, settings["input_size"])
    else:
        result = evaluation.evaluate_landmarks(predict, test_columns, fmt.kind, settings["input_size"])
    summary = {"tables": result["tables"], "parameters": model.count_params(), "train_seconds": round(train_seconds, 1),
               "steps": steps_per_epoch * epochs, "test_samples": result["count"],
               "train_samples": len(train_columns["scale"])}
    if keep_model:
        summary["model"] = model
    return summary


def verdict(spec, results):
    """Does the papers' ordering hold? Compare the key metric of the configurations in order."""
    table, column = spec["key"]
    values = {name: r["tables"][table][column] for name, r in results.items()}
    if len(values) < 2:
        return None
    order = sorted(values, key=values.get, reverse=spec["higher_is_better"])
    paper = {n: p.get(column) for n, p in spec["paper"].items() if p.get(column) is not None}
    paper_order = sorted(paper, key=paper.get, reverse=spec["higher_is_better"])
    ours = [n for n in order if n in paper]
    return {"ours_best_first": order, "paper_best_first": paper_order,
            "same_order": ours == paper_order if len(paper_order) > 1 else None}


def markdown(experiment, spec, results, settings, args, judged):
    table, _ = spec["key"]
    columns = list(next(iter(results.values()))["tables"][table])
    lines = [f"## {spec['title']}", "",
             f"Command: `python scripts/reproduce.py {experiment} {'--small ' if args.small else '--data-root ' + args.data_root + ' '}"
             f"{'--recipe papers ' if args.recipe == 'papers' else ''}"
             f"{_dtype_policy_option(args)}{_size_options(args)}"
             f"--out {args.out}` (seed {args.seed}; input "
             f"{settings['input_size']}px, {settings['overrides'] or 'full-size'} model; "
             + ("the papers' recipe: RMSprop, step decay, one stage" if args.recipe == "papers" else
                f"the default recipe: Adam, step decay, peak rate {settings['learning_rate']:g}, binary networks "
                f"in two stages, real weights for the first {training.DEFAULT_FIRST_FRACTION:.0%} of the epochs, "
                "ApproxSign gradient") + ").", "",
             "| configuration | parameters | " + " | ".join(columns) + " | paper | train s |",
             "|---|---:|" + "---:|" * len(columns) + "---|---:|"]
    for name, r in results.items():
        paper = spec["paper"].get(name)
        paper_text = ", ".join(f"{k} {v}" for k, v in paper.items()) if paper else NOT_GIVEN
        values = " | ".join(f"{r['tables'][table][c]:.2f}" for c in columns)
        lines.append(f"| `{name}` | {r['parameters']:,} | {values} | {paper_text} | {r['train_seconds']} |")
    first = next(iter(results.values()))
    lines += ["", f"{first['train_samples']} training / {first['test_samples']} test samples, "
              f"{first['steps']} steps each."]
    if judged and judged["same_order"] is not None:
        lines.append(f"Papers' ordering {'holds' if judged['same_order'] else 'does not hold'} here "
                     f"(ours, best first: {', '.join(judged['ours_best_first'])}).")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", nargs="+", choices=list(EXPERIMENTS) + ["all", "recipe"],
                        help="one or more experiments (a configuration trained the same way twice is trained once)")
    parser.add_argument("--data-root", help="root of the real data sets (layout above)")
    parser.add_argument("--small", action="store_true", help="synthetic data, small models, CPU")
    parser.add_argument("--out", default="results")
    parser.add_argument("--epochs", type=positive_int, help="default: 100 full scale, 4 small")
    parser.add_argument("--steps-per-epoch", type=positive_int, help="default: data / batch full scale, 250 small")
    parser.add_argument("--train-samples", type=positive_int, default=400, help="--small: synthetic training samples")
    parser.add_argument("--test-samples", type=positive_int, default=64, help="--small: synthetic test samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=positive_int, help="the networks' width (default: 64 with --small, each "
                        "configuration's own at full scale)")
    parser.add_argument("--depth", type=positive_int, help="the hourglasses' depth (default: 2 with --small, each "
                        "configuration's own at full scale)")
    parser.add_argument("--dtype-policy", choices=DTYPE_POLICIES, default="float32",
                        help="the Keras dtype policy the networks are built under, as train --dtype-policy: "
                        "mixed_bfloat16 trains the 256px networks about 2x faster on CPUs with AVX512_BF16 and "
                        "recent GPUs (docs/results.md); the 64px --small ones gain nothing here")
    parser.add_argument("--recipe", choices=["default", "papers"], default="default",
                        help="training recipe of the papers' experiments: this package's default (Adam with "
                        f"step decay, binary networks in two stages with real weights for the first "
                        f"{training.DEFAULT_FIRST_FRACTION * 100:.0f}%% of the epochs, "
                        "ApproxSign) or the "
                        "papers' (RMSprop, one stage, the straight-through sign)")
    parser.add_argument("--seeds", type=positive_int, default=2, help="recipe: seeds per configuration (seed, seed + 1, ...)")
    parser.add_argument("--recipes", help="recipe: only the recipes whose names contain one of these "
                        "';'-separated phrases, and their teachers (results merge into an existing recipe.json)")
    parser.add_argument("--summary", help="also write one page with every experiment in --out")
    parser.add_argument("--only-summary", action="store_true",
                        help="train nothing: rewrite --summary from the tables already in --out")
    args = parser.parse_args()
    if args.only_summary:
        if not args.summary:
            parser.error("--only-summary needs --summary PAGE")
        write_summary(args.out, args.summary)
        return
    if not args.small and not args.data_root:
        parser.error("give --data-root (real data) or --small (synthetic data)")
    settings = dict(SMALL if args.small else FULL, dtype_policy=args.dtype_policy)
    sizes = {name: value for name, value in (("width", args.width), ("depth", args.depth)) if value is not None}
    settings["overrides"] = {**settings["overrides"], **sizes}
    epochs = args.epochs or (4 if args.small else 100)
    steps = args.steps_per_epoch or (250 if args.small else None)
    root = args.data_root or os.path.join(args.out, "data")
    if args.small:
        writers.write_layout(root, args.train_samples, args.test_samples, args.seed)
    if "recipe" in args.experiment:
        if len(args.experiment) > 1:
            parser.error("recipe runs alone")
        run_recipes(args, root, settings, steps, epochs)
        return
    names = list(EXPERIMENTS) if "all" in args.experiment else list(dict.fromkeys(args.experiment))
    trained = {}  # (configuration, training and test data) -> results: the same training is done once
    for experiment in names:
        spec = EXPERIMENTS[experiment]
        recipe = PAPERS if args.recipe == "papers" else {}  # the papers' at the rate its tables were measured at
        binary = {n: c["kwargs"].get("binary", True) for n, c in models.named_configurations().items()}
        results = {}
        for name in spec["configs"]:
            key = (name, spec["train"], spec["test"], spec.get("task", "heatmaps"))
            if key not in trained:
                default = args.recipe == "default"
                trained[key] = run_config(name, spec, root, settings, steps, epochs, args.seed, recipe,
                                          two_stage=training.DEFAULT_FIRST_STAGE if default and binary[name] else None,
                                          model_options=None if default else STE)
            results[name] = trained[key]
        judged = verdict(spec, results)
        report = {"experiment": experiment, "title": spec["title"], "small": args.small, "seed": args.seed,
                  "recipe": args.recipe, "dtype_policy": args.dtype_policy, "results": results,
                  "paper": spec["paper"], "ordering": judged}
        os.makedirs(args.out, exist_ok=True)
        with atomic_path(os.path.join(args.out, f"{experiment}.json")) as temporary, open(temporary, "w") as f:
            json.dump(report, f, indent=2)
        with atomic_path(os.path.join(args.out, f"{experiment}.md")) as temporary, open(temporary, "w") as f:
            f.write(markdown(experiment, spec, results, settings, args, judged))
        print(open(os.path.join(args.out, f"{experiment}.md")).read())
    if args.summary:
        write_summary(args.out, args.summary)


def run_recipes(args, root, settings, steps, epochs):
    """Issue 12's ablation: every recipe on both benchmarks, ``args.seeds`` seeds each; writes
    ``recipe.json`` and ``recipe.md`` (means over seeds, binary against its real twin). With
    ``args.recipes`` only the matching recipes run and their results replace those in an existing
    ``recipe.json``."""
    seeds = list(range(args.seed, args.seed + args.seeds))
    chosen = [r for r in RECIPES if not args.recipes or any(w.strip() in r for w in args.recipes.split(";"))]
    path = os.path.join(args.out, "recipe.json")
    results = {}
    if args.recipes and os.path.exists(path):
        with open(path) as f:
            results = json.load(f)["results"]
    teacher_recipes = {RECIPES[r][3] for r in chosen if RECIPES[r][3]}
    chosen = sorted(set(chosen) | teacher_recipes, key=lambda r: (r not in teacher_recipes, list(RECIPES).index(r)))
    for benchmark, spec in RECIPE_BENCHMARKS.items():
        table, column = spec["key"]
        teachers = {}  # (teacher recipe, seed) -> trained model
        for recipe in chosen:
            name, options, two_stage, teacher, *model_options = RECIPES[recipe]
            runs = []
            for seed in seeds:
                run = run_config(name, spec, root, settings, steps, epochs, seed, options, two_stage,
                                 teacher=teachers.get((teacher, seed)), keep_model=recipe in teacher_recipes,
                                 model_options=model_options[0] if model_options else None)
                if recipe in teacher_recipes:
                    teachers[(recipe, seed)] = run.pop("model")
                runs.append({"seed": seed, "value": run["tables"][table][column], "train_seconds": run["train_seconds"],
                             "steps": run["steps"]})
                print(benchmark, recipe, seed, runs[-1], flush=True)
            results.setdefault(benchmark, {})[recipe] = runs
            os.makedirs(args.out, exist_ok=True)
            with atomic_path(path) as temporary, open(temporary, "w") as f:
                json.dump({"experiment": "recipe", "small": args.small, "seeds": seeds, "results": results}, f, indent=2)
    with atomic_path(os.path.join(args.out, "recipe.md")) as temporary, open(temporary, "w") as f:
        f.write(recipe_markdown(results, seeds, args))
    print(open(os.path.join(args.out, "recipe.md")).read())


def _dtype_policy_option(args) -> str:
    """How a report's command line says its --dtype-policy (nothing for the default)."""
    return "" if args.dtype_policy == "float32" else f"--dtype-policy {args.dtype_policy} "


def _size_options(args) -> str:
    """How a report's command line says its --width and --depth (nothing where not given)."""
    return "".join(f"--{name} {getattr(args, name)} " for name in ("width", "depth") if getattr(args, name) is not None)


def recipe_markdown(results, seeds, args) -> str:
    lines = ["## Training recipes for the binary HPM network (issue 12)", "",
             f"`python scripts/reproduce.py recipe {'--small ' if args.small else ''}"
             f"{_dtype_policy_option(args)}{_size_options(args)}"
             f"--seeds {len(seeds)}`: "
             f"seeds {seeds}, the same steps for every row.", ""]
    for benchmark, rows in results.items():
        higher = RECIPE_BENCHMARKS[benchmark]["higher_is_better"]
        lines += [f"### {benchmark}", "", "| recipe | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
                  "|---|" + "---:|" * (len(seeds) + 1)]
        means = {}
        for recipe, runs in sorted(rows.items(), key=lambda kv: list(RECIPES).index(kv[0])):
            values = [r["value"] for r in runs]
            means[recipe] = sum(values) / len(values)
            lines.append(f"| {recipe} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {means[recipe]:.2f} |")
        binary = {k: v for k, v in means.items() if k.startswith("binary")}
        real = {k: v for k, v in means.items() if k.startswith("real")}
        if binary and real:
            best_binary = (max if higher else min)(binary, key=binary.get)
            best_real = (max if higher else min)(real, key=real.get)
            gap = real[best_real] - binary[best_binary]
            relation = (f"{abs(gap):.2f} points {'behind' if gap >= 0 else 'ahead'}" if higher
                        else f"{binary[best_binary] / real[best_real]:.2f}x its error")
            lines += ["", f"Best binary: {best_binary} ({binary[best_binary]:.2f}); best real twin: {best_real} "
                      f"({real[best_real]:.2f}): the binary net is {relation}."]
        lines.append("")
    return "\n".join(lines)


# The papers' comparisons as claims the summary checks: (experiment, claim, better, worse).
ORDERINGS = [
    ("pooling", "max pooling beats average pooling", "binary_hpm", "binary_hpm_avgpool"),
    ("relu", "a ReLU after each convolution helps the binary HPM net", "binary_hpm_relu", "binary_hpm"),
    ("blocks", "binary HPM beats a binary bottleneck of similar size", "binary_hpm", "binary_bottleneck_matched"),
    ("segmentation", "binary HPM beats the binary bottleneck", "binary_hpm", "binary_bottleneck"),
]
# How far the binary HPM net stays behind a real-valued one: (experiment, binary, real).
GAPS = [("blocks", "binary_hpm", "real_hpm"), ("blocks", "binary_hpm", "real_bottleneck_matched"),
        ("segmentation", "binary_hpm", "real_bottleneck")]


def _key_values(spec, report):
    table, column = spec["key"]
    return column, {name: r["tables"][table][column] for name, r in report["results"].items()}


def judge_orderings(reports):
    """Markdown lines: does each of the papers' orderings hold in ``reports`` (experiment -> JSON)?"""
    lines = []
    for experiment, claim, better, worse in ORDERINGS:
        if experiment not in reports:
            continue
        spec = EXPERIMENTS[experiment]
        column, ours = _key_values(spec, reports[experiment])
        holds = ours[better] > ours[worse] if spec["higher_is_better"] else ours[better] < ours[worse]
        paper = {n: spec["paper"].get(n, {}).get(column) for n in (better, worse)}
        paper_text = (f"paper {paper[better]} vs {paper[worse]}" if None not in paper.values()
                      else "the paper's claim")
        lines.append(f"- `{experiment}`: {claim}: **{'holds' if holds else 'does not hold'}** "
                     f"(`{better}` {ours[better]:.2f} vs `{worse}` {ours[worse]:.2f} {column}; {paper_text}).")
    for experiment, binary, real in GAPS:
        if experiment not in reports:
            continue
        spec = EXPERIMENTS[experiment]
        column, ours = _key_values(spec, reports[experiment])
        paper = {n: spec["paper"].get(n, {}).get(column) for n in (binary, real)}
        paper_gap = (f"paper's gap {paper[real] - paper[binary]:.2f}" if None not in paper.values()
                     else "paper's gap not in METHOD.md")
        lines.append(f"- `{experiment}`: binary HPM against `{real}`: {ours[binary]:.2f} vs {ours[real]:.2f} "
                     f"{column}, a gap of {ours[real] - ours[binary]:.2f} points ({paper_gap}).")
    return lines


def write_summary(folder, path):
    """One page with every experiment's table found in ``folder``, in the order above, after a
    list of the papers' orderings and whether each holds."""
    reports = {}
    for experiment in EXPERIMENTS:
        if os.path.exists(os.path.join(folder, f"{experiment}.json")):
            with open(os.path.join(folder, f"{experiment}.json")) as f:
                reports[experiment] = json.load(f)
    total = sum(r["train_seconds"] for report in reports.values() for r in report["results"].values())
    parts = [open(os.path.join(folder, f"{experiment}.md")).read() for experiment in reports]
    header = (
        "# Reproduction results\n\n"
        "Each table: our numbers next to the papers', with the command that made them. "
        f"Training time in all: {total / 60:.1f} minutes.\n\n"
        "## The papers' orderings here\n\n" + "\n".join(judge_orderings(reports)) + "\n\n"
    )
    with atomic_path(path) as temporary, open(temporary, "w") as f:
        f.write(header + "\n".join(parts))


if __name__ == "__main__":
    main()
