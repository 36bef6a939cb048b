"""The OpenAI-compatible HTTP server: the engine's tokens over HTTP, streamed or not; bad requests refused alone."""
import json
import shutil
import threading
import urllib.error
import urllib.request

import pytest

import llmopt
from llmopt.server import Server

PROMPTS = ["ROMEO:", "KING:\nNow", "JULIET:\nO Romeo, Romeo", "A", "First Citizen:\nBefore we proceed"]
TEMPLATE = ("{% for m in messages %}{{ m['role'] | upper }}:\n{{ m['content'] }}\n\n{% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:\n{% endif %}")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """tiny, with a chat template in its tokenizer_config.json."""
    folder = shutil.copytree(llmopt.load.resolve("tiny"), tmp_path_factory.mktemp("chat") / "tiny-chat")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return llmopt.load_model(folder)


@pytest.fixture(scope="module")
def server(chat_model):
    model, tok = chat_model
    with llmopt.Engine(model, tok, max_batch_size=4) as engine, Server(engine, port=0, model_name="tiny-chat") as s:
        yield s


def post(server, path, body, raw=None):
    """(status, parsed JSON) of a POST; `raw` bytes are sent instead of `body`'s JSON."""
    req = urllib.request.Request(server.url + path, data=raw if raw is not None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def events(server, path, body):
    """The data of each server-sent event of a streamed POST, [DONE] included."""
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        lines = r.read().decode().split("\n\n")
    return [json.loads(x[6:]) if x != "data: [DONE]" else "[DONE]" for x in lines if x]


def test_completions_are_the_engines_greedy_tokens(server, chat_model):
    model, tok = chat_model
    for prompt in PROMPTS[:2]:
        want = llmopt.generate(model, tok, prompt, max_new_tokens=20)
        status, got = post(server, "/v1/completions", {"model": "tiny-chat", "prompt": prompt, "max_tokens": 20,
                                                        "temperature": 0})
        assert status == 200 and got["object"] == "text_completion" and got["model"] == "tiny-chat"
        assert got["choices"] == [{"index": 0, "text": want.text, "logprobs": None,
                                   "finish_reason": "length" if want.finish_reason == "length" else "stop"}]
        assert got["usage"] == {"prompt_tokens": len(want.prompt_ids), "completion_tokens": len(want.token_ids),
                                "total_tokens": len(want.prompt_ids) + len(want.token_ids)}
    # token ids as the prompt, several prompts (a choice each), a stop string, OpenAI's default length (16)
    status, got = post(server, "/v1/completions", {"prompt": [tok.encode(PROMPTS[0]), PROMPTS[1]],
                                                   "temperature": 0, "stop": ["\n\n"]})
    assert status == 200 and [c["text"] for c in got["choices"]] == \
        [llmopt.generate(model, tok, p, max_new_tokens=16, stop=["\n\n"]).text for p in PROMPTS[:2]]
    # n samples of one prompt, seeded: the engine's own
    status, got = post(server, "/v1/completions", {"prompt": "ROMEO:", "n": 3, "seed": 5, "max_tokens": 12})
    with llmopt.Engine(model, tok, max_batch_size=3) as engine:
        want = engine.sample_n("ROMEO:", 3, seed=5, max_new_tokens=12, temperature=1.0)
    assert [c["text"] for c in got["choices"]] == [g.text for g in want]
    assert got["usage"]["prompt_tokens"] == len(want[0].prompt_ids)


def test_streamed_completion_and_chat_join_to_the_whole_reply(server, chat_model):
    model, tok = chat_model
    want = llmopt.generate(model, tok, "ROMEO:", max_new_tokens=24)
    got = events(server, "/v1/completions", {"prompt": "ROMEO:", "max_tokens": 24, "temperature": 0, "stream": True,
                                             "stream_options": {"include_usage": True}})
    assert got[-1] == "[DONE]" and got[-2]["usage"]["completion_tokens"] == len(want.token_ids)
    chunks = got[:-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want.text and len(chunks) > 5
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    messages = [{"role": "system", "content": "Speak as a sentinel."}, {"role": "user", "content": "Who's there?"}]
    reply = llmopt.generate(model, tok, tok.apply_chat_template(messages), max_new_tokens=16)
    status, got = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 16, "temperature": 0})
    assert status == 200 and got["object"] == "chat.completion"
    assert got["choices"][0]["message"] == {"role": "assistant", "content": reply.text}
    parts = [{**messages[1], "content": [{"type": "text", "text": "Who's "}, {"type": "text", "text": "there?"}]}]
    chunks = events(server, "/v1/chat/completions", {"messages": [messages[0], *parts], "max_completion_tokens": 16,
                                                     "temperature": 0, "stream": True})[:-1]
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == reply.text
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}


def test_completion_logprobs_are_the_engines_and_line_up_with_the_text(server, chat_model):
    """logprobs: N gives each token, its log-probability (the engine's), its N alternatives and itself, and
    where it starts in the text; streamed, the chunks' entries join to the same."""
    model, tok = chat_model
    with llmopt.Engine(model, tok, max_batch_size=2) as engine:
        want = engine.generate_many(["KING:\nNow"], max_new_tokens=16, logprobs=3, stop=["\n\n"])[0]
    status, got = post(server, "/v1/completions", {"prompt": "KING:\nNow", "max_tokens": 16, "temperature": 0,
                                                   "logprobs": 3, "stop": ["\n\n"]})
    choice = got["choices"][0]
    lp = choice["logprobs"]
    assert status == 200 and choice["text"] == want.text
    assert lp["token_logprobs"] == want.logprobs and lp["tokens"] == [tok.decode([i]) for i in want.token_ids]
    for t, (token, top) in enumerate(zip(lp["tokens"], lp["top_logprobs"])):
        assert top == {**{tok.decode([i]): v for i, v in want.top_logprobs[t]}, token: want.logprobs[t]}
        assert max(top.values()) == top[token]                              # greedy: the most likely
    ends = lp["text_offset"][1:] + [len(choice["text"])]
    assert "".join(choice["text"][a:b] for a, b in zip(lp["text_offset"], ends)) == choice["text"]
    text = choice["text"]
    assert all(text[o:].startswith(t) for o, t in zip(lp["text_offset"], lp["tokens"]) if o < len(text))
    chunks = events(server, "/v1/completions", {"prompt": "KING:\nNow", "max_tokens": 16, "temperature": 0,
                                                "logprobs": 3, "stop": ["\n\n"], "stream": True})[:-2]
    streamed = {k: [x for c in chunks for x in c["choices"][0]["logprobs"][k]] for k in lp}
    assert streamed == {**lp, "text_offset": streamed["text_offset"]}
    assert streamed["text_offset"][:len(want.token_ids) - 1] == lp["text_offset"][:len(want.token_ids) - 1]


def test_several_choices_stream_interleaved_and_join_to_the_whole_replies(server, chat_model):
    """n samples and several prompts stream at once, each chunk naming its choice: joined by index they are the
    replies of the same request unstreamed (n seeded seed + i, as sample_n), each with its finish reason."""
    body = {"prompt": ["ROMEO:", "KING:\nNow"], "n": 3, "seed": 11, "max_tokens": 16, "temperature": 0.9,
            "logprobs": 1}
    status, whole = post(server, "/v1/completions", body)
    assert status == 200 and len(whole["choices"]) == 6
    got = events(server, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert got[-1] == "[DONE]" and got[-2]["usage"] == whole["usage"]
    chunks = [c["choices"][0] for c in got[:-2]]
    for want in whole["choices"]:
        mine = [c for c in chunks if c["index"] == want["index"]]
        assert "".join(c["text"] for c in mine) == want["text"]
        assert [x for c in mine if c["logprobs"] for x in c["logprobs"]["token_logprobs"]] == \
            pytest.approx(want["logprobs"]["token_logprobs"], abs=1e-4)          # (other batches: other rounding)
        assert [c["finish_reason"] for c in mine][-1] == want["finish_reason"]
    assert len({c["index"] for c in chunks[:12]}) > 1                     # interleaved, not one after another


def test_penalties_reach_the_engine(server, chat_model):
    """OpenAI's presence and frequency penalties and logit bias (and vLLM's repetition_penalty): the engine's
    tokens with them."""
    model, tok = chat_model
    ask = dict(presence_penalty=0.5, frequency_penalty=1.2, repetition_penalty=1.3, logit_bias={"7": -100, "30": 2})
    want = llmopt.generate(model, tok, "KING:", max_new_tokens=24, ignore_eos=True, **ask)
    assert want.token_ids != llmopt.generate(model, tok, "KING:", max_new_tokens=24, ignore_eos=True).token_ids
    status, got = post(server, "/v1/completions", {"prompt": "KING:", "max_tokens": 24, "temperature": 0,
                                                   "ignore_eos": True, "return_token_ids": True, **ask})
    assert status == 200 and got["choices"][0]["token_ids"] == want.token_ids


def test_echo_with_no_tokens_scores_the_prompt(server, chat_model):
    """echo with max_tokens 0 and logprobs (how evaluation harnesses score a text): the prompt back, each token
    after the first with its log-probability under a full forward of the model, nothing generated."""
    import torch
    model, tok = chat_model
    text = "ROMEO:\nBut soft, what light through yonder window breaks?"
    status, got = post(server, "/v1/completions", {"prompt": [text, "KING:"], "max_tokens": 0, "echo": True,
                                                   "logprobs": 1, "temperature": 0})
    assert status == 200 and got["usage"]["completion_tokens"] == 0
    choice = got["choices"][0]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    ids = tok.encode(text)
    with torch.inference_mode():
        ref = model(torch.tensor([ids]))[0].float().log_softmax(-1)
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    assert lp["token_logprobs"][1:] == pytest.approx(ref[torch.arange(len(ids) - 1), ids[1:]].tolist(), abs=1e-4)
    assert got["choices"][1]["text"] == "KING:"
    from llmopt.server import Client
    assert Client(server.url).prompt_logprobs(ids) == lp["token_logprobs"]               # the same, as ids
    with pytest.raises(ValueError, match="empty"):
        Client(server.url).prompt_logprobs("")
    # llmopt's perplexity of a served model, window by window over HTTP: the model's own
    held = llmopt.metrics.heldout_ids(tok, max_tokens=300)
    assert llmopt.metrics.perplexity(Client(server.url), ids=held, context=128) == \
        pytest.approx(llmopt.metrics.perplexity(model, ids=held, context=128), rel=1e-5)
    # echo with tokens: the prompt, then the completion, their log-probabilities in one list
    status, got = post(server, "/v1/completions", {"prompt": "KING:", "max_tokens": 4, "echo": True,
                                                   "logprobs": 0, "temperature": 0})
    want = llmopt.generate(model, tok, "KING:", max_new_tokens=4)
    lp = got["choices"][0]["logprobs"]
    assert got["choices"][0]["text"] == "KING:" + want.text
    assert lp["tokens"] == [tok.decode([i]) for i in want.prompt_ids + want.token_ids]
    assert lp["top_logprobs"][1] == {lp["tokens"][1]: lp["token_logprobs"][1]}        # logprobs 0: itself only


def test_chat_logprobs_in_openai_shape_streamed_or_not(server, chat_model):
    model, tok = chat_model
    messages = [{"role": "user", "content": "Who's there?"}]
    with llmopt.Engine(model, tok, max_batch_size=2) as engine:
        want = engine.generate_many([tok.apply_chat_template(messages)], max_new_tokens=10, logprobs=2)[0]
    body = {"messages": messages, "max_tokens": 10, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    status, got = post(server, "/v1/chat/completions", body)
    content = got["choices"][0]["logprobs"]["content"]
    assert status == 200 and [c["logprob"] for c in content] == want.logprobs
    assert [c["token"] for c in content] == [tok.decode([i]) for i in want.token_ids]
    assert all(c["bytes"] == list(c["token"].encode()) for c in content)
    assert [[a["logprob"] for a in c["top_logprobs"]] for c in content] == \
        [[v for _, v in top] for top in want.top_logprobs]
    chunks = events(server, "/v1/chat/completions", {**body, "stream": True})[:-1]
    assert [x for c in chunks if c["choices"][0]["logprobs"] for x in c["choices"][0]["logprobs"]["content"]] == content
    status, got = post(server, "/v1/chat/completions", {**body, "top_logprobs": 0})
    assert all(c["top_logprobs"] == [] for c in got["choices"][0]["logprobs"]["content"])
    status, got = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
    assert got["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/completions", None, 400, "not JSON"),
    ("/v1/completions", [1, 2], 400, "must be a JSON object"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt must be text"),
    ("/v1/completions", {"prompt": ""}, 400, "empty"),
    ("/v1/completions", {"prompt": "A", "temperature": -1}, 400, "temperature must be >= 0"),
    ("/v1/completions", {"prompt": "A", "top_p": 1.5}, 400, "top_p must be in (0, 1]"),
    ("/v1/completions", {"prompt": "A", "max_tokens": 0}, 400, "max_new_tokens must be an integer >= 1"),
    ("/v1/completions", {"prompt": "A " * 3000}, 400, "context"),
    ("/v1/completions", {"prompt": ["A", "B"], "n": 2, "stream": True, "top_k": 0}, 400, "top_k"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages must be a non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "content must be text"),
    ("/v1/completions", {"prompt": "A", "logprobs": 21}, 400, "logprobs must be an integer from 0 to 20"),
    ("/v1/completions", {"prompt": "A", "logprobs": True}, 400, "logprobs must be an integer"),
    ("/v1/completions", {"prompt": "A", "top_logprobs": 2}, 400, "for completions, send logprobs: N"),
    ("/v1/completions", {"prompt": "A", "echo": True, "stream": True}, 400, "echo is not supported with stream"),
    ("/v1/completions", {"prompt": "A", "echo": "yes"}, 400, "echo must be true or false"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2}, 400,
     "top_logprobs needs logprobs: true"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "logprobs": 1}, 400,
     "logprobs must be true or false for chat"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "echo": True}, 400,
     "echo is for /v1/completions"),
    ("/v1/completions", {"prompt": "A", "frequency_penalty": 3}, 400, "frequency_penalty must be a number in [-2, 2]"),
    ("/v1/completions", {"prompt": "A", "logit_bias": {"5": 101}}, 400, "logit_bias: the bias of token 5 must be"),
    ("/v1/completions", {"prompt": "A", "tools": [{"type": "function"}]}, 400, "tools is not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function"}]},
     400, "tools is not supported"),
    ("/v1/embeddings", {"input": "A"}, 404, "POST /v1/completions or /v1/chat/completions"),
])
def test_bad_requests_get_openai_errors_that_name_the_problem(server, path, body, status, message):
    code, got = post(server, path, body, raw=b"{not json" if body is None else None)
    assert code == status and got["error"]["type"] == "invalid_request_error"
    assert message in got["error"]["message"]


def test_a_model_without_a_chat_template_says_where_to_go(tmp_path):
    with llmopt.Engine(*llmopt.load_model("tiny"), max_batch_size=2) as engine, Server(engine, port=0) as server:
        code, got = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})
        assert code == 400 and "no chat template" in got["error"]["message"]
        assert "/v1/completions" in got["error"]["message"]
        with urllib.request.urlopen(server.url + "/v1/models") as r:
            assert json.loads(r.read())["data"][0]["id"] == "tiny"
        with urllib.request.urlopen(server.url + "/health") as r:
            assert json.loads(r.read()) == {"status": "ok"}


def test_concurrent_clients_get_unbatched_greedy_and_a_bad_one_harms_none(server, chat_model):
    """Twelve clients at once, every third sending a bad request: the good ones all get their unbatched
    greedy text (the engine batched them), the bad ones a 400."""
    model, tok = chat_model
    want = {p: llmopt.generate(model, tok, p, max_new_tokens=24, ignore_eos=True) for p in PROMPTS}
    results = {}

    def client(i):
        prompt = PROMPTS[i % len(PROMPTS)]
        body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        if i % 3 == 2:
            body["top_k"] = -1
        results[i] = post(server, "/v1/completions", body)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (code, got) in sorted(results.items()):
        if i % 3 == 2:
            assert code == 400 and "top_k" in got["error"]["message"]
        else:
            prompt = PROMPTS[i % len(PROMPTS)]
            assert code == 200 and got["choices"][0]["text"] == want[prompt].text
            assert got["choices"][0]["token_ids"] == want[prompt].token_ids
            assert got["choices"][0]["prompt_token_ids"] == want[prompt].prompt_ids


def test_a_client_that_leaves_mid_stream_frees_its_slot(chat_model):
    """Closing the connection during a long stream cancels its requests (two choices) in the engine."""
    import http.client
    model, tok = chat_model
    with llmopt.Engine(model, tok, max_batch_size=2) as engine, Server(engine, port=0) as server:
        conn = http.client.HTTPConnection(*server.httpd.server_address[:2], timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "ROMEO:", "max_tokens": 1500, "stream": True,
                                                            "temperature": 0, "ignore_eos": True, "n": 2}))
        response = conn.getresponse()
        assert response.readline().startswith(b"data: ")
        response.close()                                    # the client goes away
        conn.close()
        for _ in range(600):
            if engine.tokens_generated and not engine.scheduler.running and not engine.scheduler.waiting:
                break
            threading.Event().wait(0.05)
        assert engine.tokens_generated < 1500 and not engine.scheduler.running        # both choices cancelled


def test_serve_command_refuses_bad_options(capsys):
    from llmopt.__main__ import main
    for argv, message in [(["serve", "--port", "70000"], "--port must be in 0..65535"),
                          (["serve", "--model", "no-such-model", "--port", "0"], "no checkpoint at 'no-such-model'"),
                          (["serve", "--max-batch-size", "0", "--port", "0"], "max_batch_size"),
                          (["serve", "--max-prefill-tokens", "0", "--port", "0"], "max_prefill_tokens"),
                          (["serve", "--speculative", "no-such-draft", "--port", "0"],
                           "no checkpoint at 'no-such-draft'"),
                          (["serve", "--speculative", "lookup", "--num-speculative-tokens", "0", "--port", "0"],
                           "num_speculative_tokens")]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_serve_command_serves_until_stopped():
    """`python -m llmopt serve --port 0` prints where it listens, answers there (the same greedy text with the MLP
    draft speculating), and stops on Ctrl-C."""
    import signal
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "llmopt", "serve", "--port", "0", "--chunked-prefill",
                             "--max-prefill-tokens", "4", "--prefix-caching", "--speculative", "tiny-draft"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving tiny at http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[3]
        model, tok = llmopt.load_model("tiny")
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(
            {"prompt": "ROMEO:", "max_tokens": 8, "temperature": 0}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["choices"][0]["text"] == \
                llmopt.generate(model, tok, "ROMEO:", max_new_tokens=8).text
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        proc.stdout.close()
        proc.stderr.close()


def test_run_load_measures_the_server_over_http(server, chat_model):
    """`Client` gives run_load the engine's `submit` over HTTP: every request completes with its unbatched
    greedy tokens, timed from the client's side (first token before the last), and a refused request is a
    failed row that says why."""
    from llmopt.server import Client
    from llmopt.workload import poisson_workload, run_load, summarize_load
    model, tok = chat_model
    work = poisson_workload(tok, 12, seed=0, prompt_tokens=(8, 32), output_tokens=(4, 24))
    df = run_load(Client(server.url), work, clients=4, realtime=False, ignore_eos=True)
    assert df.ok.all() and len(df) == 12
    for item, ids in zip(work, df.token_ids):
        assert ids == llmopt.generate(model, tok, item.prompt_ids, max_new_tokens=item.max_new_tokens,
                                      ignore_eos=True).token_ids
    assert (df.ttft_s <= df.e2e_s).all() and (df.ttft_s > 0).all()
    assert summarize_load(df, "http", submitted=12)["completed"] == 12
    bad = run_load(Client(server.url), work[:2], clients=2, realtime=False, top_k=0)
    assert not bad.ok.any() and bad.error.str.contains("top_k").all()


def test_the_official_openai_client_talks_to_it(server, chat_model):
    """OpenAI's own Python client, pointed at the server: completions and chat, streamed and not, with usage,
    the model list, and a refusal raised as its BadRequestError with the engine's message."""
    openai = pytest.importorskip("openai")
    model, tok = chat_model
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    want = llmopt.generate(model, tok, "ROMEO:", max_new_tokens=12)
    got = client.completions.create(model="tiny-chat", prompt="ROMEO:", max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text and got.usage.completion_tokens == len(want.token_ids)
    pieces = client.completions.create(model="tiny-chat", prompt="ROMEO:", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in pieces) == want.text
    messages = [{"role": "user", "content": "Who's there?"}]
    reply = llmopt.generate(model, tok, tok.apply_chat_template(messages), max_new_tokens=12).text
    chat = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == reply
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-2].choices[0].finish_reason == "length"
    assert [m.id for m in client.models.list()] == ["tiny-chat"]
    lp = client.completions.create(model="tiny-chat", prompt="ROMEO:", max_tokens=4, temperature=0, logprobs=2)
    assert len(lp.choices[0].logprobs.token_logprobs) == 4 and len(lp.choices[0].logprobs.top_logprobs[0]) >= 2
    scored = client.completions.create(model="tiny-chat", prompt="ROMEO: hark", max_tokens=0, echo=True, logprobs=1)
    assert scored.choices[0].text == "ROMEO: hark" and scored.choices[0].logprobs.token_logprobs[0] is None
    chat = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=3)
    first = chat.choices[0].logprobs.content[0]
    assert len(first.top_logprobs) == 3 and first.top_logprobs[0].logprob == first.logprob   # greedy
    streamed = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=4, temperature=0,
                                              logprobs=True, top_logprobs=3, stream=True)
    assert [t.logprob for c in streamed if c.choices and c.choices[0].logprobs
            for t in c.choices[0].logprobs.content] == [t.logprob for t in chat.choices[0].logprobs.content]
    with pytest.raises(openai.BadRequestError, match="temperature must be >= 0"):
        client.completions.create(model="tiny-chat", prompt="ROMEO:", temperature=-1)
