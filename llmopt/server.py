"""An OpenAI-compatible HTTP front for the continuous-batching engine (notebook 13).

    engine = llmopt.Engine(model, tok, max_batch_size=8)
    with Server(engine, port=8000) as server:          # serves from a background thread
        print(server.url)                              # http://127.0.0.1:8000
    python -m llmopt serve --model tiny --port 8000    # the same from the command line, until Ctrl-C

    curl localhost:8000/v1/completions -d '{"prompt": "ROMEO:", "max_tokens": 32, "temperature": 0}'

Endpoints: POST /v1/completions and /v1/chat/completions take OpenAI's request bodies and
answer in its shapes ("stream": true sends server-sent events, as OpenAI's clients read
them; several prompts or n samples stream interleaved, each chunk naming its choice), GET
/v1/models and GET /health. Every request goes to the one Engine, so concurrent
clients share its decode steps; a client that goes away mid-stream cancels its request,
freeing its slot. A bad request gets a 400 with OpenAI's error body naming the problem
(the engine's own checks: prompt length, sampling parameters), and never touches the others.

As in OpenAI's API, `temperature` defaults to 1 (sampling; 0 is greedy) and `max_tokens` to 16
for completions; a chat reply gets up to `CHAT_MAX_TOKENS`. Beyond OpenAI's fields: `top_k`,
`repetition_penalty`, `ignore_eos`, and `"return_token_ids": true`, which adds each choice's
`prompt_token_ids` and `token_ids` (to check the tokens, not only the text).
Log-probabilities are the model's own (log_softmax of its logits, before temperature, top-k or top-p,
as vLLM reports them; `Engine.submit`'s `logprobs`): completions take `"logprobs": N` (each token's
and its N most likely alternatives') and `"echo": true` (the prompt comes back before the completion,
with its tokens' log-probabilities when `logprobs` is set: with `"max_tokens": 0` only the prompt,
which is how evaluation harnesses score a text); chat takes `"logprobs": true` and `"top_logprobs": N`.
Each token is shown as its own decode (a piece of a character split across tokens shows as "\ufffd");
`text_offset` counts characters into the returned text. Every generated token has an entry, the
end-of-sequence token too. `presence_penalty` and `frequency_penalty` are OpenAI's, `repetition_penalty`
vLLM's addition, and `logit_bias` OpenAI's (`Engine.submit`). What it does not implement (tools,
structured output: `UNSUPPORTED`) is refused when asked for, not ignored. Chat messages are laid out by the
checkpoint's chat template (`Tokenizer.apply_chat_template`).
`Client(url)` is the other side: the engine's `submit` over HTTP (for `workload.run_load`), and
`prompt_logprobs` to score a text, which `metrics.perplexity` uses for a served model.
The HTTP side is the standard library's ThreadingHTTPServer, a thread per connection: enough to
measure and to learn from; real traffic wants a production server in front.
"""
from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .engine import MAX_LOGPROBS, Piece, sample_seeds
from .tokenizer import IncrementalDecoder

COMPLETION_MAX_TOKENS = 16       # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS = 256            # a chat reply's default length here (OpenAI's: up to the context)
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}   # llmopt's finish reasons in OpenAI's words
# OpenAI fields this server does not implement, and the values that ask for nothing: any other value is
# refused with a 400 rather than silently ignored (fields not listed here, like "user", are ignored)
UNSUPPORTED = {"suffix": (None, ""), "best_of": (None, 1), "tools": (None, []), "functions": (None, []),
               "response_format": (None, {"type": "text"})}


class Server:
    """An `Engine` served over HTTP with OpenAI's completions and chat endpoints (notebook 13)."""

    def __init__(self, engine, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None) -> None:
        self.engine = engine
        self.model_name = model_name or getattr(engine.model, "name", None) or "llmopt"
        self.httpd = ThreadingHTTPServer((host, port), _Handler)   # port 0: any free port
        self.httpd.daemon_threads = True
        self.httpd.app = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "Server":
        """Serve from a background thread (returns at once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.httpd.serve_forever, name="llmopt-server", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop answering and free the port (the engine stays open: it is the caller's)."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the two endpoints: a request body in, the engine's requests out --------------------------
    def completions(self, body: dict) -> "_Call":
        """/v1/completions: text or token ids, one prompt or a list (a choice each)."""
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and _all_ints(prompt)):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or (isinstance(p, list) and _all_ints(p))
                                                         for p in prompt):
            prompts = prompt
        else:
            raise ValueError("prompt must be text, a list of token ids, or a list of either (one choice each), "
                             f"got {prompt!r:.60}")
        return _Call.parse("text_completion", prompts, body, COMPLETION_MAX_TOKENS)

    def chat(self, body: dict) -> "_Call":
        """/v1/chat/completions: the messages laid out by the chat template."""
        messages = body.get("messages")
        if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
        messages = [{**m, "content": _text_content(m.get("content"))} for m in messages]
        if not getattr(self.engine.tokenizer, "chat_template", None):
            raise ValueError(f"{self.model_name} has no chat template (a base model's tokenizer has none): "
                             "POST the prompt as text to /v1/completions, or serve an instruct checkpoint")
        prompt = self.engine.tokenizer.apply_chat_template(messages)
        return _Call.parse("chat.completion", [prompt], body, CHAT_MAX_TOKENS)

    def answer(self, handler: "_Handler", call: "_Call") -> None:
        """Submit to the engine (its checks raise here, before any reply is sent), then answer."""
        if call.stream:
            self._stream(handler, call, self._submit_all(call))
            return
        if call.n > 1:
            gens = [g for p in call.prompts for g in self.engine.sample_n(p, call.n, **call.options)]
        else:
            gens = [h.result() for h in self._submit_all(call)]
        tok = self.engine.tokenizer
        choices = [{"index": i, **call.choice(g, tok, call.prompts[i // call.n])} for i, g in enumerate(gens)]
        handler.send_json(200, {
            **self._head(call.kind), "choices": choices,
            "usage": _usage(sum(len(g.prompt_ids) for g in gens[::call.n]),
                            0 if call.prompt_only else sum(len(g.token_ids) for g in gens))})

    def _submit_all(self, call: "_Call") -> list:
        """An engine request a choice, in the reply's order: n per prompt, sample i seeded seed + i (as
        `Engine.sample_n`, without its shared prefill). All or none: a refused one cancels the others."""
        seeds = sample_seeds(call.options["seed"], call.n) if call.n > 1 else [call.options["seed"]]
        handles = []
        try:
            for p in call.prompts:
                for seed in seeds:
                    handles.append(self.engine.submit(p, **{**call.options, "seed": seed}))
        except Exception:
            for h in handles:
                h.cancel()
            raise
        return handles

    def _stream(self, handler: "_Handler", call: "_Call", handles: list) -> None:
        """Server-sent events: a chunk per piece of text of any choice (its `index` says which), one with each
        choice's finish reason, then [DONE]. A thread per choice reads its pieces into one queue."""
        head = self._head(call.kind + ".chunk" if call.kind == "chat.completion" else call.kind)
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.end_headers()

        def event(data) -> None:
            handler.wfile.write(b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n\n")
            handler.wfile.flush()

        merged: queue.SimpleQueue = queue.SimpleQueue()

        def pump(i: int, handle) -> None:
            try:
                for piece in handle.pieces():
                    merged.put((i, piece))
                merged.put((i, handle.result()))
            except BaseException as e:       # the request failed or was cancelled
                merged.put((i, e))

        for i, h in enumerate(handles):
            threading.Thread(target=pump, args=(i, h), name="llmopt-stream", daemon=True).start()
        first, logprobs = [True] * len(handles), [_Logprobs(self.engine.tokenizer, call) for _ in handles]
        finished = []
        try:
            while len(finished) < len(handles):
                i, item = merged.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Piece):
                    if item.text or call.logprobs is not None:      # a last piece may carry tokens only
                        event({**head, "choices": [{"index": i, **call.delta(item.text, first[i]),
                                                    "logprobs": logprobs[i].of_piece(item), "finish_reason": None}]})
                        first[i] = False
                    continue
                finished.append(item)                                # the choice's Generation
                ids = dict(prompt_token_ids=item.prompt_ids, token_ids=item.token_ids) if call.return_token_ids else {}
                event({**head, "choices": [{"index": i, **call.delta("", first[i], last=True), "logprobs": None,
                                            "finish_reason": FINISH.get(item.finish_reason), **ids}]})
            if call.include_usage:
                event({**head, "choices": [], "usage": _usage(sum(len(g.prompt_ids) for g in finished) // call.n,
                                                              sum(len(g.token_ids) for g in finished))})
            event(b"[DONE]")
        except (BrokenPipeError, ConnectionResetError):
            pass                         # the client went away: its requests are cancelled below
        except Exception as e:           # a request failed in the engine, after the reply began
            event({"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error"}})
        finally:
            for h in handles:            # (a no-op for the finished ones)
                h.cancel()

    def _head(self, kind: str) -> dict:
        return {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
                "created": int(time.time()), "model": self.model_name}


class Client:
    """An OpenAI-compatible server reached with the Engine's `submit`, so `workload.run_load` measures it
    over HTTP (notebook 13).

    Each request streams, and the client stamps each server-sent event as it arrives: time to
    first token, time per output token and end-to-end latency as a user of the server sees them,
    the network and HTTP included. `submit` returns a finished `concurrent.futures.Future` of a
    `Generation` (its `token_ids` from llmopt's `return_token_ids`; `stats` has no queue time,
    which only the server knows); an error reply raises its message from `result()`.
    """

    def __init__(self, url: str, *, timeout: float = 600.0) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout

    def submit(self, prompt, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, stop=None, ignore_eos: bool = False) -> Future:
        future: Future = Future()
        body = {"prompt": prompt, "max_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
                "top_p": top_p, "seed": seed, "stop": stop, "ignore_eos": ignore_eos, "stream": True,
                "return_token_ids": True}
        try:
            future.set_result(self._stream({k: v for k, v in body.items() if v is not None}))
        except Exception as e:     # the server's refusal, or a network error: the caller's to see
            future.set_exception(e)
        return future

    def prompt_logprobs(self, prompt) -> list[float | None]:
        """Each prompt token's log-probability given the tokens before it (None for the first), as the server
        computes it: `echo` with `max_tokens` 0 and `logprobs`, what evaluation harnesses send to score a text
        (notebook 13: the served model's perplexity). `prompt`: text or token ids."""
        body = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0}
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())["choices"][0]["logprobs"]["token_logprobs"]
        except urllib.error.HTTPError as e:
            raise ValueError(json.loads(e.read())["error"]["message"]) from None

    def _stream(self, body: dict):
        from .generate import Generation
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        start, times, pieces, last = time.perf_counter(), [], [], None
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                for line in r:                                   # "data: {...}" lines, blank between
                    if not line.startswith(b"data: {"):
                        continue
                    event = json.loads(line[len(b"data: "):])
                    if "error" in event:
                        raise RuntimeError(event["error"]["message"])
                    choice = event["choices"][0]
                    if choice["finish_reason"] is None and choice["text"]:
                        times.append(time.perf_counter() - start)
                        pieces.append(choice["text"])
                    else:
                        last = choice
        except urllib.error.HTTPError as e:
            raise ValueError(json.loads(e.read())["error"]["message"]) from None
        e2e = time.perf_counter() - start
        ids = last["token_ids"]
        ttft = times[0] if times else e2e
        tpot = (times[-1] - times[0]) / (len(ids) - 1) if len(ids) > 1 and times else float("nan")
        stats = dict(prompt_tokens=len(last["prompt_token_ids"]), new_tokens=len(ids), ttft_s=ttft, tpot_s=tpot,
                     e2e_s=e2e, decode_tokens_per_s=1 / tpot if tpot > 0 else float("nan"), events=len(times))
        return Generation(token_ids=ids, text="".join(pieces), prompt_ids=last["prompt_token_ids"],
                          finish_reason=last["finish_reason"], stats=stats, token_times=times)  # OpenAI's words


class _Handler(BaseHTTPRequestHandler):
    server_version = "llmopt"

    def log_message(self, format, *args) -> None:     # quiet: a notebook would print every request
        pass

    def do_GET(self) -> None:
        app = self.server.app
        if self.path == "/health":
            self.send_json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [
                {"id": app.model_name, "object": "model", "created": 0, "owned_by": "llmopt"}]})
        else:
            self.send_error_json(404, f"no GET {self.path}: GET /v1/models or /health, "
                                      "POST /v1/completions or /v1/chat/completions")

    def do_POST(self) -> None:
        app = self.server.app
        routes = {"/v1/completions": app.completions, "/v1/chat/completions": app.chat}
        if self.path not in routes:
            self.send_error_json(404, f"no POST {self.path}: POST /v1/completions or /v1/chat/completions")
            return
        try:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw or b"null")
            except json.JSONDecodeError as e:
                raise ValueError(f"the request body is not JSON ({e})") from None
            if not isinstance(body, dict):
                raise ValueError("the request body must be a JSON object, e.g. {\"prompt\": \"ROMEO:\"}")
            app.answer(self, routes[self.path](body))
        except (ValueError, TypeError) as e:     # the request's fault: the engine's checks name it
            self.send_error_json(400, str(e))
        except RuntimeError as e:                # the engine closed or stopped
            self.send_error_json(503, str(e), kind="server_error")
        except Exception as e:                   # the request failed in the engine
            self.send_error_json(500, f"{type(e).__name__}: {e}", kind="server_error")

    def send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self.send_json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})


@dataclass
class _Call:
    """One request, parsed: what goes to the engine, and the shape of the reply."""
    kind: str                   # "text_completion" or "chat.completion"
    prompts: list               # text or token ids, a choice each
    options: dict               # Engine.submit's keyword arguments
    n: int                      # samples per prompt
    stream: bool
    include_usage: bool         # a last streamed event with the token counts
    return_token_ids: bool      # llmopt's extension: each choice's token ids too
    logprobs: int | None = None     # alternatives a token to report (0: the chosen token's own only), or none
    echo: bool = False          # completions: the prompt comes first in the reply
    prompt_only: bool = False   # echo with max_tokens 0: the prompt (and its log-probabilities) only

    @classmethod
    def parse(cls, kind: str, prompts: list, body: dict, default_max: int) -> "_Call":
        """The engine's options from an OpenAI request body (OpenAI's defaults where it is silent)."""
        for name, nothing in UNSUPPORTED.items():
            if body.get(name) not in nothing:
                raise ValueError(f"{name} is not supported by llmopt's server (got {body[name]!r:.60}): leave it out")
        logprobs, echo = _logprobs_asked(kind, body)
        stream = bool(body.get("stream", False))
        if echo and stream:
            raise ValueError("echo is not supported with stream: send the request without stream")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        prompt_only = echo and max_tokens == 0
        if prompt_only:
            max_tokens = 1       # the engine computes a token; the reply leaves it out
        temperature, top_p, n = body.get("temperature"), body.get("top_p"), body.get("n") or 1
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        options = dict(max_new_tokens=default_max if max_tokens is None else max_tokens,
                       temperature=1.0 if temperature is None else temperature,
                       top_p=None if top_p in (None, 1, 1.0) else top_p, top_k=body.get("top_k"),
                       seed=body.get("seed"), stop=body.get("stop"), ignore_eos=bool(body.get("ignore_eos", False)),
                       logprobs=logprobs, prompt_logprobs=echo and logprobs is not None,
                       **{name: body[name] for name in ("presence_penalty", "frequency_penalty", "repetition_penalty",
                                                        "logit_bias") if body.get(name) is not None})
        return cls(kind, prompts, options, n, stream,
                   bool((body.get("stream_options") or {}).get("include_usage", False)),
                   bool(body.get("return_token_ids", False)), logprobs, echo, prompt_only)

    def choice(self, g, tokenizer, prompt) -> dict:
        """A finished Generation as one of the reply's choices (without its index); `prompt` as asked."""
        ids, logprobs, top = g.token_ids, g.logprobs, g.top_logprobs
        text, finish = g.text, FINISH.get(g.finish_reason, g.finish_reason)
        if self.prompt_only:
            ids, logprobs, top, text, finish = [], [], [], "", "length"
        before = ""
        if self.echo:
            before = prompt if isinstance(prompt, str) else tokenizer.decode(g.prompt_ids)
            ids = g.prompt_ids + ids
            if self.logprobs is not None:
                ptop = g.prompt_top_logprobs or [None] + [[] for _ in g.prompt_ids[1:]]    # logprobs 0
                logprobs, top = g.prompt_logprobs + logprobs, ptop + top
        if self.kind == "text_completion":
            out = {"text": before + text, "logprobs": None}
            if self.logprobs is not None:
                out["logprobs"] = _Logprobs(tokenizer, self).completion(ids, logprobs, top, len(before + text))
        else:
            out = {"message": {"role": "assistant", "content": text}, "logprobs": None}
            if self.logprobs is not None:
                out["logprobs"] = {"content": _Logprobs(tokenizer, self).chat(ids, logprobs, top), "refusal": None}
        out["finish_reason"] = finish
        if self.return_token_ids:
            out.update(prompt_token_ids=g.prompt_ids, token_ids=[] if self.prompt_only else g.token_ids)
        return out

    def delta(self, piece: str, first: bool, last: bool = False) -> dict:
        """A streamed piece of text in the reply's shape (a chat names the role in its first chunk)."""
        if self.kind == "text_completion":
            return {"text": piece, "logprobs": None}
        if last and not first:
            return {"delta": {}}
        return {"delta": {"role": "assistant", "content": piece} if first else {"content": piece}}


class _Logprobs:
    """Token ids and their log-probabilities in OpenAI's shapes: the legacy completions' `tokens`,
    `token_logprobs`, `top_logprobs` (a dict per token: its alternatives and itself) and `text_offset`,
    or chat's list of {token, logprob, bytes, top_logprobs}. Offsets count characters into the text, as
    the tokens' text is released (`IncrementalDecoder`), across the pieces of a stream."""

    def __init__(self, tokenizer, call: _Call) -> None:
        self.tokenizer, self.call = tokenizer, call
        self.decoder = IncrementalDecoder(tokenizer)

    def token(self, i: int) -> str:
        return self.tokenizer.decode([i], skip_special_tokens=False)

    def completion(self, ids, logprobs, top, end: int | None = None) -> dict:
        offsets = []
        for i in ids:
            offsets.append(len(self.decoder.text))
            self.decoder.push(i)
        if end is not None:                    # text cut at a stop string: later tokens sit at its end
            offsets = [min(o, end) for o in offsets]
        tokens = [self.token(i) for i in ids]
        tops = [None if alts is None else {**{self.token(a): v for a, v in alts}, t: lp}
                for t, lp, alts in zip(tokens, logprobs, top)]
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}

    def chat(self, ids, logprobs, top) -> list[dict]:
        def entry(i, lp) -> dict:
            t = self.token(i)
            return {"token": t, "logprob": lp, "bytes": list(t.encode())}
        return [{**entry(i, lp), "top_logprobs": [entry(a, v) for a, v in alts or []]}
                for i, lp, alts in zip(ids, logprobs, top)]

    def of_piece(self, piece) -> dict | None:
        """A streamed piece's log-probabilities (None when the request did not ask)."""
        if self.call.logprobs is None:
            return None
        if self.call.kind == "text_completion":
            return self.completion(piece.token_ids, piece.logprobs, piece.top_logprobs)
        return {"content": self.chat(piece.token_ids, piece.logprobs, piece.top_logprobs), "refusal": None}


def _logprobs_asked(kind: str, body: dict) -> tuple[int | None, bool]:
    """(alternatives a token to report or None, echo) from completions' `logprobs`: N and `echo`, or chat's
    `logprobs`: true and `top_logprobs`: N."""
    def count(name):
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not 0 <= value <= MAX_LOGPROBS):
            raise ValueError(f"{name} must be an integer from 0 to {MAX_LOGPROBS} (alternatives reported a "
                             f"token), got {value!r:.60}")
        return value

    if kind == "text_completion":
        if body.get("top_logprobs") is not None:
            raise ValueError("top_logprobs is the chat endpoint's: for completions, send logprobs: N")
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise ValueError(f"echo must be true or false, got {echo!r:.60}")
        return count("logprobs"), echo
    if body.get("echo") not in (None, False):
        raise ValueError("echo is for /v1/completions: the chat endpoint does not echo its messages")
    asked = body.get("logprobs")
    if asked is not None and not isinstance(asked, bool):      # (1 == True in Python: not enough)
        raise ValueError(f"logprobs must be true or false for chat (top_logprobs: N for alternatives), "
                         f"got {asked!r:.60}")
    top = count("top_logprobs")
    if top and not asked:
        raise ValueError("top_logprobs needs logprobs: true")
    return (top or 0) if asked else None, False


def _text_content(content) -> str:
    """A message's content: text, or OpenAI's list of parts (their text parts joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(p.get("text", "") for p in content)
    raise ValueError(f"a message's content must be text (or a list of text parts), got {content!r:.60}")


def _all_ints(xs) -> bool:
    return all(isinstance(x, int) and not isinstance(x, bool) for x in xs)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
