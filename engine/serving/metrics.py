"""Prometheus metrics of the server (GET /metrics), in a registry of their own."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """`http`: the families of the HTTP server (requests by route and status, latency); `engine`: those of the
    scheduler and the ranks. An API server in a process of its own (engine.serving.api_process) keeps the first
    and asks rank 0 for the second at each scrape, through `remote`."""

    def __init__(self, http: bool = True, engine: bool = True):
        self.registry = r = CollectorRegistry()
        self.remote = None  # an async callable giving more of the exposition (rank 0's), or None
        # Routing counts stay on the device; with one rank, a scrape reads them through this callable.
        self.routing_reader = None
        if http:
            self.request_latency = Histogram("tessera_request_latency_seconds", "Request latency, arrival to answer",
                                             ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
            self.requests = Counter("tessera_requests", "Requests by endpoint and HTTP status",
                                    ["endpoint", "status"], registry=r)
        if engine:
            self._engine_families(r)

    def _engine_families(self, r: CollectorRegistry) -> None:
        self.time_to_first_token = Histogram("tessera_time_to_first_token_seconds",
                                             "Arrival to first generated token", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("tessera_queue_depth", "Requests waiting for a batch", registry=r)
        self.batch_size = Histogram("tessera_batch_size", "Sequences per batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_tokens = Histogram("tessera_batch_tokens", "Prompt tokens per batch",
                                      buckets=(16, 64, 256, 1024, 4096, 16384, 65536), registry=r)
        self.tokens_in = Counter("tessera_tokens_in", "Prompt tokens processed", registry=r)
        self.tokens_out = Counter("tessera_tokens_out", "Tokens generated", registry=r)
        self.expert_load = Counter("tessera_expert_tokens", "Token-expert pairs routed, per MoE layer and expert",
                                   ["layer", "expert"], registry=r)
        self.tokens_dropped = Counter("tessera_tokens_dropped", "Token-expert pairs dropped by a capacity limit",
                                      registry=r)
        self.rank_compute = Counter("tessera_rank_compute_seconds", "Compute time per rank", ["rank"], registry=r)
        self.kv_blocks_used = Gauge("tessera_kv_blocks_used", "Paged KV cache blocks in use, per rank", ["rank"],
                                    registry=r)
        self.kv_blocks_free = Gauge("tessera_kv_blocks_free", "Paged KV cache blocks free, per rank", ["rank"],
                                    registry=r)
        self.running = Gauge("tessera_running_requests", "Requests generating on a rank", registry=r)
        self.waiting = Gauge("tessera_waiting_requests", "Requests admitted but not yet generating (rank 0's queue "
                             "and the ranks' waiting lists, preempted ones included)", registry=r)
        self.preemptions = Counter("tessera_preemptions", "Requests preempted when the KV cache was full (their "
                                   "cache freed and recomputed later)", registry=r)
        self.time_per_output_token = Histogram("tessera_time_per_output_token_seconds",
                                               "Per request: first token to last, over the tokens after the first",
                                               buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                                        2.5), registry=r)
        self._preempted = {}
        self.healthy = Gauge("tessera_healthy", "1 while every rank answers", registry=r)
        self.healthy.set(1)
        self._routing_seen: dict[tuple[int, str], list[int]] = {}

    def record_results(self, results: list[dict]) -> None:
        """Per-rank compute time and routing statistics of one executed operation."""
        for rank, result in enumerate(results):
            self.rank_compute.labels(str(rank)).inc(result["seconds"])
            self._add_routing(rank, result.get("routing", {}))

    def _add_routing(self, rank: int, totals: dict[str, list[int]]) -> None:
        """`totals`: per layer, pairs per expert and dropped pairs since tracking started; counts the growth."""
        for layer, counts in totals.items():
            seen = self._routing_seen.get((rank, layer), [0] * len(counts))
            for expert, (count, before) in enumerate(zip(counts[:-1], seen)):
                if count > before:
                    self.expert_load.labels(layer, str(expert)).inc(count - before)
            self.tokens_dropped.inc(max(counts[-1] - seen[-1], 0))
            self._routing_seen[(rank, layer)] = counts

    def record_kv(self, kv: list[dict], waiting: int) -> None:
        """The continuous scheduler's state after a step: `kv` per rank from `RankBatch.stats()`."""
        for rank, stats in enumerate(kv):
            self.kv_blocks_used.labels(str(rank)).set(stats["blocks_total"] - stats["blocks_free"])
            self.kv_blocks_free.labels(str(rank)).set(stats["blocks_free"])
            new = stats["preemptions"] - self._preempted.get(rank, 0)
            if new > 0:
                self.preemptions.inc(new)
            self._preempted[rank] = stats["preemptions"]
        self.running.set(sum(stats["running"] for stats in kv))
        self.waiting.set(waiting + sum(stats["waiting"] for stats in kv))

    def render(self) -> bytes:
        if self.routing_reader is not None:
            self._add_routing(0, self.routing_reader())
        return generate_latest(self.registry)
