"""What the engine's per-request options cost, and the served model's perplexity over HTTP (run from the repo root:
`python results/cpu-xeon-2core-2026-11-29-logprobs-penalties/engine_options.py`)."""
import torch

import llmopt
from llmopt.metrics import heldout_ids, perplexity
from llmopt.server import Client, Server
from llmopt.workload import poisson_workload

model, tok = llmopt.load_model("tiny")
work = poisson_workload(tok, 32, seed=0, prompt_tokens=(8, 48), output_tokens=(64, 64))
prompts = [w.prompt_ids for w in work]
rows = []
for label, options in [("plain", {}), ("logprobs=5", dict(logprobs=5)), ("logprobs=20", dict(logprobs=20)),
                       ("presence 0.5 + frequency 0.5", dict(presence_penalty=0.5, frequency_penalty=0.5)),
                       ("repetition 1.2", dict(repetition_penalty=1.2))]:
    engine = llmopt.Engine(model, tok, max_batch_size=8)
    t = llmopt.measure(lambda: engine.generate_many(prompts, max_new_tokens=64, ignore_eos=True, **options),
                       warmup=1, repeats=5)
    rows.append((label, 32 * 64 / t["median"]))
for label, tps in rows:
    print(f"{label:30} {tps:7.0f} tokens/s   {tps / rows[0][1]:.2f}x plain")

ids = heldout_ids(tok, max_tokens=4096)
with llmopt.Engine(model, tok, max_batch_size=2) as engine, Server(engine, port=0) as server:
    served = perplexity(Client(server.url), ids=ids, context=256)
local = perplexity(model, ids=ids, context=256)
print(f"perplexity of the test split's first {len(ids)} tokens, windows of 256: over HTTP {served:.5f}, "
      f"in process {local:.5f} ({served / local - 1:+.1e})")
print(torch.__version__, torch.get_num_threads(), "threads")
