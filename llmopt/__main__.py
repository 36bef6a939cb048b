"""Command line: `python -m llmopt bench [experiments] [--quick] [--out DIR] [--model PATH] [--text FILE]`,
`python -m llmopt generate`, `python -m llmopt chat`, `python -m llmopt serve`."""
from __future__ import annotations

import argparse
import math
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmopt")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run the before/after suite and write a report")
    b.add_argument("experiments", nargs="*", help="subset to run (default: all)")
    b.add_argument("--quick", action="store_true", help="CI sizes (also set by LLMOPT_CI=1)")
    b.add_argument("--out", help="report folder (default reports/bench-<time>)")
    b.add_argument("--device", help="cpu, cuda, cuda:1 (default: auto, cuda when a GPU is visible)")
    b.add_argument("--model", default="tiny",
                   help="tiny (default), or your own Llama / Mistral / Qwen2 checkpoint folder")
    b.add_argument("--text", metavar="FILE",
                   help="your own UTF-8 text: perplexity is scored on it and prompts are cut from it "
                        "(default: the plays' held-out test split)")
    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("prompt")
    g.add_argument("--model", default="tiny")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop before this text (may be given several times)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, mps, or auto: cuda when a GPU is visible (default: cpu)")
    g.add_argument("--dtype", help="fp32, fp16 or bf16 (default: the checkpoint's)")
    g.add_argument("--compile", nargs="?", const=True, default=False,
                   help="compile the decode step: no value for the default mode, or default, "
                        "reduce-overhead (CUDA graphs on a GPU), max-autotune")
    g.add_argument("--sync-every", type=int, default=1, help="read tokens back every k steps (GPU)")
    g.add_argument("--graph-steps", type=int, default=1, help="greedy: k decode steps per CUDA graph (GPU)")
    g.add_argument("--draft", metavar="DRAFT",
                   help="speculative decoding: 'lookup' (prompt lookup), 'tiny-draft' (the MLP draft), "
                        "'tiny-draft-llama' or your draft's folder; with --stats also the acceptance rate")
    g.add_argument("--num-speculative-tokens", type=int, default=4, help="draft tokens a round, with --draft")
    g.add_argument("--logprobs", type=int, metavar="K",
                   help="after the text, each token's probability and the others among the K most likely there")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, -2 to 2 (default 0: none)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, -2 to 2 (default 0: none)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="transformers', > 0 (default 1: none)")
    g.add_argument("--stats", action="store_true", help="print TTFT, TPOT and tokens/s to stderr at the end")
    g.add_argument("--chat", action="store_true",
                   help="send the prompt as a user's message through the checkpoint's chat template (instruct models)")
    c = sub.add_parser("chat", help="chat with an instruct checkpoint, a line a turn, the KV cache kept between turns")
    c.add_argument("--model", default="tiny")
    c.add_argument("--system", help="the system message of the conversation")
    c.add_argument("--max-new-tokens", type=int, default=256, help="the longest reply")
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--top-p", type=float)
    c.add_argument("--seed", type=int)
    c.add_argument("--device", help="cpu, cuda, cuda:1, or auto (default: cpu)")
    c.add_argument("--dtype", help="fp32, fp16 or bf16 (default: the checkpoint's)")
    c.add_argument("--stats", action="store_true", help="after each reply, the tokens prefilled and reused, and speed")
    v = sub.add_parser("serve", help="serve a model over HTTP with OpenAI's completions and chat endpoints")
    v.add_argument("--model", default="tiny")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded together (the engine's slots)")
    v.add_argument("--prefix-caching", action="store_true", help="share the KV blocks of common prompt prefixes")
    v.add_argument("--chunked-prefill", action="store_true",
                   help="compute long prompts in chunks over several steps, so running requests do not stall")
    v.add_argument("--max-prefill-tokens", type=int, default=512, help="prompt tokens a step (default 512)")
    v.add_argument("--speculative", metavar="DRAFT",
                   help="speculative decoding: 'lookup' (prompt lookup), an MLP draft ('tiny-draft', or a folder "
                        "from python -m llmopt.draft) or a smaller model with the same tokenizer ('tiny-draft-llama') "
                        "proposing tokens each step for every request")
    v.add_argument("--num-speculative-tokens", type=int, default=4, help="draft tokens a request a step (default 4)")
    v.add_argument("--speculative-max-batch", type=int,
                   help="no drafts in a step with more requests decoding than this (default: always speculate)")
    v.add_argument("--device", help="cpu, cuda, cuda:1, or auto (default: cpu)")
    v.add_argument("--dtype", help="fp32, fp16 or bf16 (default: the checkpoint's)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(parser, args)
    if args.command == "chat":
        return _chat(parser, args)

    if args.command == "bench":
        from .bench import ci_mode, run_bench
        try:
            run_bench(args.experiments or None, quick=args.quick or ci_mode(), out=args.out,
                      device=args.device, model=args.model, text=args.text)
        except (ValueError, FileNotFoundError) as e:
            parser.error(str(e))
        return 0
    from . import generate, load_model, stream
    from .generate import NO_PENALTIES
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, stop=args.stop, compile=args.compile,
                   sync_every=args.sync_every, graph_steps=args.graph_steps)
    unset = dict(NO_PENALTIES, logprobs=None)                    # options that generate runs on the engine
    on_engine = {k: v for k, v in dict(logprobs=args.logprobs, presence_penalty=args.presence_penalty,
                                       frequency_penalty=args.frequency_penalty,
                                       repetition_penalty=args.repetition_penalty).items() if v != unset[k]}
    try:
        model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
        prompt = tok.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
        if args.draft is not None:
            return _speculate(args, model, tok, prompt, options, on_engine)
        if args.stats or on_engine:   # the whole text at the end, then its log-probabilities or timings
            g = generate(model, tok, prompt, **options, **on_engine)
            print(g.text)
            if g.logprobs is not None:
                print()
                for t, lp, top in zip(g.token_ids, g.logprobs, g.top_logprobs):
                    others = "  ".join(f"{tok.decode([i])!r} {math.exp(v):.3f}" for i, v in top if i != t)
                    print(f"{tok.decode([t])!r:>16} {math.exp(lp):.3f}   {others}")
            if not args.stats:
                return 0
            st = g.stats
            print(f"{st['new_tokens']} tokens ({g.finish_reason}); TTFT {st['ttft_s'] * 1e3:.1f} ms, TPOT "
                  f"{st['tpot_s'] * 1e3:.2f} ms, {st['decode_tokens_per_s']:.1f} tokens/s decoding, on "
                  f"{st['device']} in {st['dtype']}", file=sys.stderr)
            return 0
        for piece in stream(model, tok, prompt, **options):
            print(piece, end="", flush=True)
    except (ValueError, FileNotFoundError) as e:    # a bad option, an unknown or incomplete model
        parser.error(str(e))
    print()
    return 0


def _speculate(args, model, tok, prompt, options: dict, on_engine: dict) -> int:
    """`generate --draft`: speculative decoding (llmopt.speculative), the text at the end; with --stats its timings,
    the acceptance rate and tokens per target forward on stderr."""
    from . import load_model
    from .speculative import speculative_generate
    unsupported = [f"--{k.replace('_', '-')}" for k, v in on_engine.items()]
    unsupported += [flag for flag, on in (("--compile", options.pop("compile")),
                                          ("--sync-every", options.pop("sync_every") != 1),
                                          ("--graph-steps", options.pop("graph_steps") != 1)) if on]
    if unsupported:
        raise ValueError(f"--draft runs speculative decoding, which does not take {', '.join(unsupported)}: "
                         "leave them out, or the draft")
    draft = args.draft if args.draft == "lookup" else load_model(args.draft, device=args.device)[0]
    g = speculative_generate(model, draft, tok, prompt, k=args.num_speculative_tokens, **options)
    print(g.text)
    if args.stats:
        st = g.stats
        print(f"{st['new_tokens']} tokens ({g.finish_reason}); TTFT {st['ttft_s'] * 1e3:.1f} ms, TPOT "
              f"{st['tpot_s'] * 1e3:.2f} ms, {st['decode_tokens_per_s']:.1f} tokens/s decoding; draft "
              f"{st['draft']}, k={st['k']}: acceptance {st['acceptance_rate']:.2f}, "
              f"{st['tokens_per_target_forward']:.2f} tokens per target forward", file=sys.stderr)
    return 0


def _chat(parser, args) -> int:
    """`python -m llmopt chat`: a Session's chat turns, one line of stdin each, until end of input."""
    from . import Session, load_model
    try:
        model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
        if not tok.chat_template:
            raise ValueError(f"{args.model} has no chat template (a base model's tokenizer has none): chat with an "
                             "instruct checkpoint, or use `python -m llmopt generate` with a text prompt")
        session = Session(model, tok)
        options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed)
        system = args.system
        for line in sys.stdin:
            if not line.strip():
                continue
            for piece in session.stream_chat(line.rstrip("\n"), system=system, **options):
                print(piece, end="", flush=True)         # the reply as it is generated
            print(flush=True)
            system, g = None, session.last
            if args.stats:
                st = g.stats
                reused = st["context_tokens"] - st["prefilled_tokens"] - st["new_tokens"]
                print(f"[{st['prefilled_tokens']} tokens prefilled, {reused} reused from the cache; "
                      f"{st['new_tokens']} generated ({g.finish_reason}), {st['decode_tokens_per_s']:.1f} tokens/s]",
                      file=sys.stderr, flush=True)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    return 0


def _serve(parser, args) -> int:
    """`python -m llmopt serve`: an Engine behind an OpenAI-compatible HTTP server, until Ctrl-C."""
    from . import Engine, load_model
    from .server import Server
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    try:
        model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
        draft = args.speculative
        if draft not in (None, "lookup"):
            draft = load_model(draft, device=args.device)[0]
        engine = Engine(model, tok, max_batch_size=args.max_batch_size, prefix_caching=args.prefix_caching,
                        chunked_prefill=args.chunked_prefill, max_prefill_tokens=args.max_prefill_tokens,
                        speculative=draft, num_speculative_tokens=args.num_speculative_tokens,
                        speculative_max_batch=args.speculative_max_batch)
        server = Server(engine, host=args.host, port=args.port, model_name=args.model)
    except (ValueError, FileNotFoundError, OSError) as e:    # an unknown model, bad options, a port in use
        parser.error(str(e))
    print(f"serving {args.model} at {server.url} (POST /v1/completions, /v1/chat/completions; Ctrl-C stops)",
          flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
