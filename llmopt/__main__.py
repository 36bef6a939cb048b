"""Command line: `python -m llmopt bench [experiments] [--quick] [--out DIR]`, `python -m llmopt generate`."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmopt")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run the before/after suite and write a report")
    b.add_argument("experiments", nargs="*", help="subset to run (default: all)")
    b.add_argument("--quick", action="store_true", help="CI sizes (also set by LLMOPT_CI=1)")
    b.add_argument("--out", help="report folder (default reports/bench-<time>)")
    b.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("prompt")
    g.add_argument("--model", default="tiny")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    args = parser.parse_args(argv)

    if args.command == "bench":
        from .bench import ci_mode, run_bench
        try:
            run_bench(args.experiments or None, quick=args.quick or ci_mode(), out=args.out,
                      device=args.device)
        except ValueError as e:
            parser.error(str(e))
        return 0
    from . import load_model, stream
    try:
        model, tok = load_model(args.model)
        for piece in stream(model, tok, args.prompt, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed):
            print(piece, end="", flush=True)
    except (ValueError, FileNotFoundError) as e:    # a bad option, an unknown or incomplete model
        parser.error(str(e))
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
