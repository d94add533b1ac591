"""The command line. Each subcommand calls one plain function of the Python API and nothing more."""

from __future__ import annotations

import argparse
import json
import sys

from transferkit.errors import RecipeError, TransferKitError


def _cmd_run(args: argparse.Namespace) -> int:
    from transferkit.pipeline import run_recipe

    out = run_recipe(args.recipe, out=args.out, resume=args.resume, overwrite=args.overwrite, overrides=args.overrides)
    print(f"run directory: {out}\nreport: {out / 'report.html'}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from transferkit.recipe import apply_overrides, read_yaml, validate_recipe

    raw = apply_overrides(read_yaml(args.recipe), args.overrides)
    _, problems = validate_recipe(raw)
    if problems:
        print(f"{args.recipe}: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"{args.recipe}: valid")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from transferkit.predict import load_run

    predictions = load_run(args.run_dir).predict(args.files, top_k=args.top_k)
    if args.json:
        print(json.dumps(predictions, indent=2))
        return 0
    for p in predictions:
        top = "  ".join(f"{t['label']} {t['probability']:.3f}" for t in p["top"])
        print(f"{p['file']}: {top}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from transferkit.demo import run_demo

    run_demo(out=args.out, overwrite=args.overwrite)
    return 0


def _cmd_ls(args: argparse.Namespace) -> int:
    from transferkit.data import DATASETS
    from transferkit.sources import BUILTIN_SOURCES, PREFIXES
    from transferkit.strategies import STRATEGIES

    sections = {
        "sources (built-in; also " + ", ".join(f"{p}:NAME" for p in PREFIXES) + ", or a path)":
            BUILTIN_SOURCES.describe(),
        "strategies": STRATEGIES.describe(),
        "datasets (built-in; also an image folder or a CSV manifest path,label)": DATASETS.describe(),
    }
    if args.json:
        print(json.dumps({k.split(" ")[0]: v for k, v in sections.items()}, indent=2))
        return 0
    for title, items in sections.items():
        print(title)
        for name, help_ in items.items():
            print(f"  {name:<16} {help_}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferkit", description="Transfer learning on PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a recipe and write a run directory")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.epochs=5")
    p.add_argument("--out", help="run directory (default runs/NAME)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    g.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("validate", help="report every problem of a recipe")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("predict", help="top-k labels for images, from a run directory or model folder")
    p.add_argument("run_dir")
    p.add_argument("files", nargs="+")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("demo", help="EfficientNet-Lite0 (ImageNet) -> MNIST digits, 20 per class, offline")
    p.add_argument("--out", default="demo_runs")
    p.add_argument("--overwrite", action="store_true", default=True, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("ls", help="list sources, strategies and datasets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_ls)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TransferKitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
