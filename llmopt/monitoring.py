"""Prometheus metrics for the serving engine (notebook 13).

    metrics = EngineMetrics()
    engine = llmopt.Engine(model, tok, max_batch_size=8, metrics=metrics)
    metrics.serve(port=9400)          # optional: http://localhost:9400/metrics for a Prometheus scraper
    metrics.snapshot()                # the same figures as a dict, for plotting while the load runs

Counters: requests by outcome (finished, failed, cancelled), tokens generated, and with speculation draft tokens
proposed and accepted (their ratio over a window is the acceptance rate; vLLM exports the same pair).
Gauges: requests waiting, sequences running, KV blocks in use.
Histograms: queue time, time to first token, time per output token, end-to-end latency.
Each EngineMetrics has its own registry, so several engines never clash.
"""
from __future__ import annotations

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
OUTCOMES = ("finished", "failed", "cancelled")


class EngineMetrics:
    """The engine's Prometheus metrics; the engine calls `submitted`, `step` and `finished`."""

    def __init__(self, namespace: str = "llmopt") -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError as e:  # pragma: no cover
            raise ImportError("EngineMetrics needs prometheus-client: pip install prometheus-client") from e
        self.registry = CollectorRegistry()
        kw = dict(namespace=namespace, registry=self.registry)
        self.requests = Counter("requests", "Requests by outcome", ["outcome"], **kw)
        self.submitted_total = Counter("requests_submitted", "Requests submitted", **kw)
        self.tokens = Counter("generated_tokens", "Tokens generated", **kw)
        self.drafted = Counter("spec_draft_tokens", "Draft tokens proposed and verified (speculation)", **kw)
        self.draft_accepted = Counter("spec_accepted_tokens", "Draft tokens the model accepted (speculation)", **kw)
        self.waiting = Gauge("requests_waiting", "Requests queued, not yet running", **kw)
        self.running = Gauge("sequences_running", "Sequences in the running batch", **kw)
        self.blocks = Gauge("kv_blocks_used", "KV cache blocks in use", **kw)
        self.blocks_total = Gauge("kv_blocks_total", "KV cache blocks in the pool", **kw)
        self.queue_time = Histogram("queue_seconds", "Time from submission to first scheduling",
                                    buckets=LATENCY_BUCKETS, **kw)
        self.ttft = Histogram("time_to_first_token_seconds", "Time from submission to the first token",
                              buckets=LATENCY_BUCKETS, **kw)
        self.tpot = Histogram("time_per_output_token_seconds", "Mean time between output tokens",
                              buckets=TPOT_BUCKETS, **kw)
        self.e2e = Histogram("e2e_seconds", "Time from submission to the last token",
                             buckets=LATENCY_BUCKETS, **kw)
        for outcome in OUTCOMES:          # export zeros from the start
            self.requests.labels(outcome)
        self._tokens_seen = self._drafted_seen = self._accepted_seen = 0
        self.server = None

    # ---- called by the engine -------------------------------------------------------------
    def submitted(self) -> None:
        self.submitted_total.inc()

    def step(self, engine) -> None:
        manager = engine.cache.manager
        self.waiting.set(engine.num_waiting)
        self.running.set(engine.num_running)
        self.blocks.set(manager.num_blocks - manager.num_free)
        self.blocks_total.set(manager.num_blocks)
        self.tokens.inc(engine.tokens_generated - self._tokens_seen)
        self._tokens_seen = engine.tokens_generated
        self.drafted.inc(engine.drafted - self._drafted_seen)
        self.draft_accepted.inc(engine.draft_accepted - self._accepted_seen)
        self._drafted_seen, self._accepted_seen = engine.drafted, engine.draft_accepted

    def finished(self, seq) -> None:
        outcome = {"finished": "finished", "cancelled": "cancelled"}.get(seq.state, "failed")
        self.requests.labels(outcome).inc()
        if outcome != "finished":
            return
        times = seq.token_times
        if seq.first_scheduled is not None:
            self.queue_time.observe(seq.first_scheduled - seq.submitted)
        if times:
            self.ttft.observe(times[0])
            self.e2e.observe(times[-1])
        if len(times) > 1:
            self.tpot.observe((times[-1] - times[0]) / (len(times) - 1))

    # ---- reading them ------------------------------------------------------------------------
    def serve(self, port: int = 9400, addr: str = "127.0.0.1"):
        """Expose /metrics over HTTP for a Prometheus scraper; returns the port."""
        from prometheus_client import start_http_server
        self.server, _ = start_http_server(port, addr=addr, registry=self.registry)
        return self.server.server_port

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()       # and free the port
            self.server = None

    def text(self) -> str:
        """The Prometheus text exposition format, as a scrape would see it."""
        from prometheus_client import generate_latest
        return generate_latest(self.registry).decode()

    def snapshot(self) -> dict:
        """Current values as a flat dict: counters, gauges, and each histogram's count, sum and mean."""
        get = self.registry.get_sample_value
        out = {f"requests_{o}": get("llmopt_requests_total", {"outcome": o}) or 0.0 for o in OUTCOMES}
        out.update(submitted=get("llmopt_requests_submitted_total") or 0.0,
                   tokens=get("llmopt_generated_tokens_total") or 0.0,
                   spec_draft_tokens=get("llmopt_spec_draft_tokens_total") or 0.0,
                   spec_accepted_tokens=get("llmopt_spec_accepted_tokens_total") or 0.0,
                   waiting=get("llmopt_requests_waiting"), running=get("llmopt_sequences_running"),
                   kv_blocks_used=get("llmopt_kv_blocks_used"))
        for name in ("queue_seconds", "time_to_first_token_seconds", "time_per_output_token_seconds",
                     "e2e_seconds"):
            count = get(f"llmopt_{name}_count") or 0.0
            total = get(f"llmopt_{name}_sum") or 0.0
            out[f"{name}_count"] = count
            out[f"{name}_mean"] = total / count if count else float("nan")
        return out
