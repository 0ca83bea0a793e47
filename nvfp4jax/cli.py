"""``nvfp4jax`` command line: a small dispatcher, one subcommand per job.

    nvfp4jax convert SRC DST [--recipe nvfp4]   official / NVIDIA NVFP4 checkpoint -> our NVFP4 checkpoint
    nvfp4jax inspect DIR [--headers-only]       layers, formats, sizes, anomalies (exit 1 on errors)
    nvfp4jax synthesize DIR [--preset tiny]     a synthetic checkpoint of known random weights
    nvfp4jax generate [--prompt TEXT]           generate text (embedded tiny model, or --checkpoint DIR)

Each subcommand registers its arguments in ``_add_<name>`` and runs in ``_run_<name>``; heavy
imports happen inside the run functions so ``nvfp4jax --help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
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


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text; with no checkpoint, an embedded tiny random model")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch; default 'hello')")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the tiny preset with seed-0 random weights)")
    p.add_argument("--tokenizer", help="tokenizer.json (HF tokenizers); default: the byte tokenizer")
    p.add_argument("--recipe", choices=RECIPES, help="precision recipe when loading a checkpoint")
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--raw", action="store_true", help="no chat template: the prompt text is the whole input")
    p.add_argument("--thinking", action="store_true", help="thinking mode (<think>) instead of chat mode (</think>)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (and the embedded model's weights seed)")
    p.add_argument("--stop", type=int, action="append", default=[], help="extra stop token id (EOS always stops)")
    p.add_argument("--mtp", action="store_true", help="MTP speculative decoding (reports the acceptance rate)")
    p.add_argument("--max-len", type=int, help="tokens per slot of the decode state (default: as needed)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--devices", type=int, default=1,
                   help="shard the model over N devices: experts over an 'expert' mesh axis (all-to-all dispatch), "
                        "see nvfp4jax.sharding")
    p.add_argument("--tensor", type=int, default=1, help="of the N devices, the tensor-parallel width")
    p.add_argument("--prefill-chunk", type=int, default=0,
                   help="prompt tokens per prefill step (0 = auto: 1 for the embedded model, so prefill reuses "
                        "the decode compilation; a power-of-two bucket otherwise)")


def _run_generate(args) -> int:
    try:
        return _generate(args)
    except (ValueError, FileNotFoundError) as e:  # bad sampling values, prompt too long, tokenizer/model mismatch
        print(f"nvfp4jax generate: error: {e}", file=sys.stderr)
        return 2


def _generate(args) -> int:
    import time

    from nvfp4jax.generate import Sampling, generate
    from nvfp4jax.tokenizer import ByteTokenizer, HFTokenizer, StreamDecoder, chat_prompt

    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)  # bad values fail before loading
    t0 = time.perf_counter()
    mesh = None
    if args.devices > 1:
        import jax

        from nvfp4jax.sharding import make_mesh

        if args.devices > jax.device_count():
            raise ValueError(f"--devices {args.devices}: only {jax.device_count()} devices are visible")
        mesh = make_mesh(args.devices, tensor=args.tensor)
    if args.checkpoint and mesh is not None:  # each weight put on its sharding as its layer is read
        from nvfp4jax.checkpoint.sharded import load_sharded

        model, _ = load_sharded(args.checkpoint, mesh, recipe=args.recipe)
    elif args.checkpoint:
        from nvfp4jax.checkpoint import load_model

        model, _ = load_model(args.checkpoint, recipe=args.recipe)
    else:
        from nvfp4jax.config import preset
        from nvfp4jax.model import random_model

        model = random_model(preset("tiny", **({"recipe": args.recipe} if args.recipe else {})), args.seed)
    tok = HFTokenizer(args.tokenizer) if args.tokenizer else ByteTokenizer()
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids, the model's vocabulary {model.cfg.vocab_size}")
    texts = args.prompt or ["hello"]
    prompts = [tok.encode(t if args.raw else chat_prompt(t, args.system, thinking=args.thinking)) for t in texts]
    load_seconds = time.perf_counter() - t0
    stream = StreamDecoder(tok) if len(prompts) == 1 else None

    def on_token(i: int, token: int) -> None:
        if stream is not None:
            print(stream.push([token]), end="", flush=True)

    chunk = args.prefill_chunk or (None if args.checkpoint else 1)
    state, mesh_context = None, contextlib.nullcontext()
    if mesh is not None:
        import jax

        from nvfp4jax.sharding import shard_model, shard_state
        from nvfp4jax.state import init_state

        model = shard_model(model, mesh)  # a no-op for a model loaded by load_sharded
        max_len = args.max_len or max(len(p) for p in prompts) + args.max_new_tokens
        state = shard_state(init_state(model, len(prompts), max_len, args.page_size), mesh)
        mesh_context = jax.set_mesh(mesh)
    with mesh_context:
        result = generate(model, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                          stop_tokens=[tok.eos_id, *args.stop], on_token=on_token, max_len=args.max_len,
                          page_size=args.page_size, prefill_chunk=chunk, speculative=args.mtp, state=state)
    if stream is not None:
        print(stream.flush())
    for i, ids in enumerate(result.tokens):
        if stream is None:
            print(f"[{i}] {tok.decode(ids)}")
        print(f"[{i}] tokens: {ids} ({result.finish[i]})")
    generated = sum(len(t) for t in result.tokens)
    print(f"model ready in {load_seconds:.1f} s; prompt {result.prompt_tokens} tokens, prefill {result.prefill_seconds:.2f} s "
          f"(with compilation); {generated} tokens in {len(result.step_seconds)} decode steps, "
          f"{result.tokens_per_second:.1f} tokens/s (first, compiling step excluded)")
    if args.mtp:
        print(f"MTP acceptance rate: {result.acceptance_rate:.1%} ({result.accepted}/{result.drafted} drafts)")
    return 0


COMMANDS = {"convert": (_add_convert, _run_convert), "inspect": (_add_inspect, _run_inspect),
            "synthesize": (_add_synthesize, _run_synthesize),
            "generate": (_add_generate, _run_generate)}


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
