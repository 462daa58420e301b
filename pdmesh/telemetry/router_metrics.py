"""The router's own Prometheus families, registered on the process's registry beside the generic
ones of ``metrics.Metrics`` (which already count every gRPC call by method and code, and — fed by
the router's ``TokenTimer`` — TTFT, inter-token latency and output tokens as the router's clients
see them, queue wait included).

    pdmesh_router_requests_total{mode}                 routed: aggregated | disaggregated
    pdmesh_router_request_errors_total{code}           Generate calls that failed (not cancels)
    pdmesh_router_rejected_total{reason}               queue_full (429) | queue_timeout (408)
    pdmesh_router_retries_total                        attempts after a failure, before tokens
    pdmesh_router_migrations_total{worker}             streams moved off a worker mid-way
    pdmesh_router_cancellations_total                  calls the client cancelled (or let expire)
    pdmesh_router_routing_decisions_total{policy,worker}
    pdmesh_router_cache_matched_tokens_total{policy}   prompt tokens the chosen worker's routing
    pdmesh_router_cache_prompt_tokens_total{policy}      tree matched / prompt tokens routed
    pdmesh_router_cache_match_ratio{policy}            the same per decision (histogram)
    pdmesh_router_overhead_seconds                     admitted → worker call issued
    pdmesh_router_queue_wait_seconds                   time in the admission queue
    pdmesh_router_queue_depth                          requests waiting for a slot now
    pdmesh_router_active_requests                      requests holding a slot now
    pdmesh_router_worker_in_flight{worker,role}        the router's requests on each worker
    pdmesh_router_worker_circuit_state{worker,role}    0 closed, 1 open, 2 half-open (SGLang's)
    pdmesh_router_worker_healthy{worker,role}          1 when its last health check passed

Cache metrics exist for the policies that keep a prefix tree (``cache_aware``, ``kv_cost``);
the hit rate is ``rate(matched) / rate(prompt)``. The per-worker gauges are read from the live
worker set at scrape time (``watch_workers``), so a removed worker's series disappear with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# router overhead is a few hundred microseconds when all is well; tokenization can take ms
OVERHEAD_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
QUEUE_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
CIRCUIT_STATE_VALUES = {"closed": 0, "open": 1, "half_open": 2}


@dataclass(frozen=True)
class WorkerGauges:
    """One worker's figures at scrape time."""

    worker: str
    role: str
    in_flight: int
    circuit_state: str  # a key of CIRCUIT_STATE_VALUES
    healthy: bool


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """``registry``: the process's (``Metrics.registry``); a fresh one by default."""
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter(
            "pdmesh_router_requests",
            "Requests routed to a worker, by mode (aggregated: one worker; disaggregated: a "
            "prefill/decode pair)",
            ["mode"],
            registry=r,
        )
        self.errors = Counter(
            "pdmesh_router_request_errors",
            "Generate calls that failed, by gRPC status code (client cancels excluded)",
            ["code"],
            registry=r,
        )
        self.rejected = Counter(
            "pdmesh_router_rejected",
            "Requests refused by admission control (queue_full, queue_timeout)",
            ["reason"],
            registry=r,
        )
        self.retries = Counter(
            "pdmesh_router_retries",
            "Attempts made on another worker or pair after a failure before the first token",
            registry=r,
        )
        self.migrations = Counter(
            "pdmesh_router_migrations",
            "Streams moved off a worker that failed after tokens were sent",
            ["worker"],
            registry=r,
        )
        self.cancellations = Counter(
            "pdmesh_router_cancellations",
            "Generate calls the client cancelled or let expire (cancelled on every worker)",
            registry=r,
        )
        self.decisions = Counter(
            "pdmesh_router_routing_decisions",
            "Workers chosen, by routing policy and worker",
            ["policy", "worker"],
            registry=r,
        )
        self.cache_matched_tokens = Counter(
            "pdmesh_router_cache_matched_tokens",
            "Prompt tokens the chosen worker's routing tree matched (prefix-tree policies)",
            ["policy"],
            registry=r,
        )
        self.cache_prompt_tokens = Counter(
            "pdmesh_router_cache_prompt_tokens",
            "Prompt tokens routed by prefix-tree policies",
            ["policy"],
            registry=r,
        )
        self.cache_match_ratio = Histogram(
            "pdmesh_router_cache_match_ratio",
            "Matched / prompt tokens of each decision of a prefix-tree policy",
            ["policy"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "pdmesh_router_overhead_seconds",
            "Time in the router from admission to issuing the worker call (tokenize, "
            "detokenizer stream, routing decision)",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "pdmesh_router_queue_wait_seconds",
            "Time requests waited for a slot (--max-concurrent-requests)",
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "pdmesh_router_queue_depth", "Requests waiting for a slot", registry=r
        )
        self.active = Gauge("pdmesh_router_active_requests", "Requests holding a slot", registry=r)

    def watch_admission(self, queued: Callable[[], int], active: Callable[[], int]) -> None:
        """Read queue depth and active requests at scrape time."""
        self.queue_depth.set_function(queued)
        self.active.set_function(active)

    def watch_workers(self, snapshot: Callable[[], Iterable[WorkerGauges]]) -> None:
        """Serve the per-worker gauges from ``snapshot()``, called at each scrape."""
        self.registry.register(_WorkerCollector(snapshot))

    def routed(self, policy: str, worker: str, prompt_tokens: int, matched: int | None) -> None:
        """One routing decision; ``matched``: tokens the policy's tree matched on ``worker``
        (None for policies without a tree)."""
        self.decisions.labels(policy, worker).inc()
        if matched is None or prompt_tokens <= 0:
            return
        self.cache_matched_tokens.labels(policy).inc(matched)
        self.cache_prompt_tokens.labels(policy).inc(prompt_tokens)
        self.cache_match_ratio.labels(policy).observe(min(matched / prompt_tokens, 1.0))


class _WorkerCollector(Collector):
    def __init__(self, snapshot: Callable[[], Iterable[WorkerGauges]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        labels = ["worker", "role"]
        in_flight = GaugeMetricFamily(
            "pdmesh_router_worker_in_flight", "The router's requests on the worker", labels=labels
        )
        circuit = GaugeMetricFamily(
            "pdmesh_router_worker_circuit_state",
            "The worker's circuit breaker: 0 closed, 1 open, 2 half-open",
            labels=labels,
        )
        healthy = GaugeMetricFamily(
            "pdmesh_router_worker_healthy",
            "1 when the worker's last health check (or call) found it serving",
            labels=labels,
        )
        for w in self._snapshot():
            values = [w.worker, w.role]
            in_flight.add_metric(values, w.in_flight)
            circuit.add_metric(values, CIRCUIT_STATE_VALUES[w.circuit_state])
            healthy.add_metric(values, 1 if w.healthy else 0)
        yield from (in_flight, circuit, healthy)
