"""``/metrics``: the server's counters and histograms, and the store's own ``stats()``, in the
Prometheus text format (one registry per server, so nothing global leaks between servers).

Names follow Prometheus conventions: counters end in ``_total``, durations are ``_seconds``,
sizes ``_bytes``, ratios ``_ratio``. The store's figures are not re-derived here: every scrape
reads ``store.stats()`` (``tierstore.metrics``) and renders it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# time to first token spans a resumed turn (milliseconds) to a long cold prefill (a minute)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
TIERS = ("hot", "warm", "cold")


class StoreCollector:
    """Renders ``store.stats()`` at every scrape (nothing while the store is not open)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        store = self.engine.store
        if store is None or store.cold.closed:
            return
        s = store.stats()
        used = GaugeMetricFamily("tierstore_tier_used_bytes", "bytes in use per tier", labels=["tier"])
        budget = GaugeMetricFamily("tierstore_tier_budget_bytes", "byte budget per tier (cold: its quota, if any)",
                                   labels=["tier"])
        blocks = GaugeMetricFamily("tierstore_tier_blocks", "blocks resident per tier", labels=["tier"])
        for tier in TIERS:
            used.add_metric([tier], getattr(s, f"{tier}_used_bytes"))
            if getattr(s, f"{tier}_budget_bytes") is not None:
                budget.add_metric([tier], getattr(s, f"{tier}_budget_bytes"))
            blocks.add_metric([tier], getattr(s, f"{tier}_blocks"))
        yield from (used, budget, blocks)
        for name, counts, tiers, what in (("promotions", s.promotions, ("warm", "cold"), "up"),
                                          ("demotions", s.demotions, ("hot", "warm"), "down")):
            fam = CounterMetricFamily(f"tierstore_{name}", f"blocks moved {what}, by the tier they left",
                                      labels=["tier"])
            for tier in sorted(set(tiers) | set(counts)):
                fam.add_metric([tier], counts.get(tier, 0))
            yield fam
        yield CounterMetricFamily("tierstore_tier_moved_bytes", "bytes moved between tiers", value=s.bytes_moved)
        yield GaugeMetricFamily("tierstore_memory_fragmentation_ratio",
                                "token slots allocated in hot blocks but not filled", value=s.memory_fragmentation)
        if s.cache_hit_rate >= 0:
            yield GaugeMetricFamily("tierstore_hot_hit_ratio", "block reads served from the hot tier",
                                    value=s.cache_hit_rate)
        yield GaugeMetricFamily("tierstore_sessions", "committed sessions in the store", value=s.sessions)


class ServeMetrics:
    """The server's metrics; ``render()`` is the ``/metrics`` body."""

    def __init__(self, engine) -> None:
        disable_created_metrics()  # no `_created` twin of every counter: a server's metrics, not a library's
        r = self.registry = CollectorRegistry()
        self._prompt_sum = self._reused_sum = 0  # the hit ratio's terms (counters do not read back)
        self.requests = Counter("tierstore_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "code"], registry=r)
        self.cancelled = Counter("tierstore_requests_cancelled",
                                 "generations stopped or skipped because the client went away", registry=r)
        self.generations = Counter("tierstore_generations", "requests that reached the model", registry=r)
        self.prefix_hits = Counter("tierstore_prefix_hits", "generations that resumed a stored prefix", registry=r)
        self.prompt_tokens = Counter("tierstore_prompt_tokens", "prompt tokens of generations", registry=r)
        self.reused = Counter("tierstore_prompt_tokens_reused",
                              "prompt tokens resumed from the store instead of prefilled", registry=r)
        self.prefilled = Counter("tierstore_prompt_tokens_prefilled", "prompt tokens run through the model",
                                 registry=r)
        self.completion_tokens = Counter("tierstore_completion_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("tierstore_time_to_first_token_seconds",
                              "from the request's arrival (queue included) to its first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("tierstore_time_per_output_token_seconds", "between consecutive generated tokens",
                              buckets=TOKEN_BUCKETS, registry=r)
        Gauge("tierstore_prefix_hit_ratio", "share of prompt tokens resumed from the store",
              registry=r).set_function(self._hit_ratio)
        Gauge("tierstore_queue_depth", "admitted requests waiting for a worker",
              registry=r).set_function(engine.queue_depth)
        Gauge("tierstore_requests_running", "requests generating (at most --max-running)", registry=r).set_function(engine.running)
        r.register(StoreCollector(engine))

    def _hit_ratio(self) -> float:
        return self._reused_sum / self._prompt_sum if self._prompt_sum else 0.0

    def prompt(self, tokens: int, reused: int) -> None:
        self._prompt_sum += tokens
        self._reused_sum += reused
        self.generations.inc()
        self.prompt_tokens.inc(tokens)
        self.reused.inc(reused)
        self.prefilled.inc(tokens - reused)
        if reused:
            self.prefix_hits.inc()

    def token(self, seconds: float, first: bool) -> None:
        (self.ttft if first else self.tpot).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
