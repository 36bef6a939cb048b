"""The engine's sampling step with every row penalized (repetition 1.2, frequency 0.5), B rows of `tiny`'s 4,096
logits, greedy: microseconds a step (200 calls after 20). Run against a checkout: `python sample_step.py REPO`
(REPO's llmopt is imported: the commit before 200a135 for the loop over rows, 200a135 or later for the batch)."""
import sys
import time

import torch

sys.path.insert(0, sys.argv[1])
import llmopt  # noqa: E402
from llmopt.engine import Engine  # noqa: E402

torch.set_num_threads(2)
model, tok = llmopt.load_model("tiny")
for B in (8, 32, 64):
    e = Engine(model, tok, max_batch_size=B)
    seqs = [e._new_sequence("ROMEO:", max_new_tokens=64, repetition_penalty=1.2, frequency_penalty=0.5)
            for _ in range(B)]
    for s in seqs:
        s.state = "running"
        e.scheduler.running.append(s)
    logits = torch.randn(B, 4096)
    with torch.inference_mode():
        for _ in range(20):
            e._sample_tensor(seqs, logits)
        t = time.perf_counter()
        for _ in range(200):
            e._sample_tensor(seqs, logits)
    print(B, round((time.perf_counter() - t) / 200 * 1e6), "us a step")
