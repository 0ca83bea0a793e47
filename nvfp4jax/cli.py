"""``nvfp4jax`` command line: a small dispatcher, one subcommand per job.

    nvfp4jax convert SRC DST [--recipe nvfp4]   official / NVIDIA NVFP4 checkpoint -> our NVFP4 checkpoint
    nvfp4jax inspect DIR [--headers-only]       layers, formats, sizes, anomalies (exit 1 on errors)
    nvfp4jax synthesize DIR [--preset tiny]     a synthetic checkpoint of known random weights

Each subcommand registers its arguments in ``_add_<name>`` and runs in ``_run_<name>``; heavy
imports happen inside the run functions so ``nvfp4jax --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys

from nvfp4jax.config import PRESETS, RECIPES


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint to our NVFP4 layout (loads with no conversion work)")
    p.add_argument("src", help="checkpoint directory (official DeepSeek-V4, NVIDIA NVFP4, or ours)")
    p.add_argument("dst", help="output directory (created; must not hold a checkpoint)")
    p.add_argument("--recipe", choices=RECIPES, default="nvfp4")
    p.add_argument("--shard-size", default="5GiB", help="maximum shard size, e.g. 5GiB, 512MiB (default 5GiB)")
    p.add_argument("--no-mtp", action="store_true", help="drop the MTP block")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _run_convert(args) -> int:
    from nvfp4jax.checkpoint.convert import convert_checkpoint, summarize
    from nvfp4jax.checkpoint.writer import parse_size

    conversions = convert_checkpoint(args.src, args.dst, recipe=args.recipe, max_shard_bytes=parse_size(args.shard_size),
                                     include_mtp=False if args.no_mtp else None, progress=not args.quiet)
    print(f"wrote {args.dst} (recipe {args.recipe}, {len(conversions)} tensors)")
    print(summarize(conversions))
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="describe a checkpoint and report anomalies")
    p.add_argument("dir", help="checkpoint directory")
    p.add_argument("--headers-only", action="store_true", help="skip reading scales (only headers and config)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _run_inspect(args) -> int:
    from nvfp4jax.checkpoint.inspect import format_report, inspect_checkpoint, report_dict

    report = inspect_checkpoint(args.dir, scan=not args.headers_only, progress=not args.quiet)
    print(json.dumps(report_dict(report), indent=2) if args.json else format_report(report))
    return 1 if report.errors else 0


def _add_synthesize(sub) -> None:
    p = sub.add_parser("synthesize", help="write a synthetic checkpoint of deterministic random weights")
    p.add_argument("dir", help="output directory")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size (only tiny fits in memory)")
    p.add_argument("--layout", choices=("official", "nvidia"), default="official")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", default="1MiB")


def _run_synthesize(args) -> int:
    from nvfp4jax.checkpoint.random_weights import random_official_weights
    from nvfp4jax.checkpoint.synthetic import write_checkpoint
    from nvfp4jax.checkpoint.writer import parse_size
    from nvfp4jax.config import preset

    cfg = preset(args.preset)
    files = write_checkpoint(args.dir, cfg, random_official_weights(cfg, args.seed), layout=args.layout,
                             max_shard_bytes=parse_size(args.shard_size), progress=True)
    print(f"wrote {args.dir}: {args.layout} layout, {len(files)} shards")
    return 0


COMMANDS = {"convert": (_add_convert, _run_convert), "inspect": (_add_inspect, _run_inspect),
            "synthesize": (_add_synthesize, _run_synthesize)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nvfp4jax", description="DeepSeek-V4 inference in JAX with NVFP4")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    args = parser.parse_args(argv)
    from nvfp4jax.checkpoint.safetensors_io import CheckpointError

    try:
        return COMMANDS[args.command][1](args)
    except (CheckpointError, FileExistsError) as e:
        print(f"nvfp4jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
