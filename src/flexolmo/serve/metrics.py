"""`/metrics`: Prometheus counters of one server, in a registry of its own (no process-wide state, so two
servers in one process, as in tests, count apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("flexolmo_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.tokens = Counter("flexolmo_tokens", "tokens processed, prompt and completion apart", ["part"],
                              registry=self.registry)
        # An owner's credit: the expert's share of each request's routing weight times that request's tokens,
        # summed over requests (so it reads as tokens' worth of routing, comparable across owners).
        self.expert_tokens = Counter("flexolmo_expert_routed_tokens",
                                     "tokens' worth of routing weight attributed to each expert's owner",
                                     ["expert", "part"], registry=self.registry)
        self.running = Gauge("flexolmo_running_requests", "requests in the running batch", registry=self.registry)
        self.waiting = Gauge("flexolmo_waiting_requests", "requests waiting to join the batch",
                             registry=self.registry)
        self.active_set_version = Gauge("flexolmo_active_set_version", "version of the active set in force (0: none)",
                                        registry=self.registry)
        self.failed_closed = Gauge("flexolmo_failed_closed", "1 while the server serves the public expert only "
                                   "because the active set cannot be used", registry=self.registry)

    def record_usage(self, usage: dict) -> None:
        """Count one finished request's tokens and their attribution (`usage` as the response carries it)."""
        for part, count_key in (("prompt", "prompt_tokens"), ("completion", "completion_tokens")):
            count = usage[count_key]
            self.tokens.labels(part).inc(count)
            for expert, share in usage["experts"][part].items():
                self.expert_tokens.labels(expert, part).inc(share * count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
