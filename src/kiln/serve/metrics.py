"""Prometheus metrics of one server (its own registry, so servers in one process do not mix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kiln.infer.engine import Engine

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, engine: Engine):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kiln_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.active = Gauge("kiln_active_requests", "Generation requests being answered now", registry=r)
        Gauge("kiln_active_slots", "Engine slots decoding now", registry=r).set_function(lambda: engine.active_slots)
        Gauge("kiln_waiting_requests", "Requests queued for a slot", registry=r).set_function(lambda: engine.waiting)
        Gauge("kiln_slots", "Engine slots in all", registry=r).set(engine.max_slots)
        self.prompt_tokens = Counter("kiln_prompt_tokens", "Prompt tokens prefilled", registry=r)
        Gauge("kiln_prompt_tokens_cached", "Prompt tokens taken from the prefix cache instead of computed, since start",
              registry=r).set_function(lambda: engine.stats["cached_prompt_tokens"])
        self.generation_tokens = Counter("kiln_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("kiln_time_to_first_token_seconds", "From request to its first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("kiln_inter_token_latency_seconds", "Between two tokens of one sample",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("kiln_request_duration_seconds", "From request to its last token",
                                  buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
