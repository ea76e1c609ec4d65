"""The model replicas' Prometheus metrics, through ``ray.serve.metrics``.

Serve adds the deployment, replica and application tags, and Ray exports every metric
with a ``ray_`` prefix on each node's metrics port (this needs ``ray[default]``). Step
metrics carry an ``op`` tag: ``append`` or ``generate``.

- ``longllava_step_latency_ms``: one append, or one whole generation, on the replica;
- ``longllava_step_tokens``: tokens an append or generation added to the history;
- ``longllava_checkpoint_lag_steps``: at each reply, the step acknowledged minus the
  last durable one, and the same summed over resident sessions (gauge ``..._total``);
- ``longllava_sessions_resident``, ``longllava_sessions_evicted``: sessions in memory,
  and how many were evicted to the store;
- ``longllava_state_bytes``: the resident sessions' state;
- ``longllava_restores`` and ``longllava_restore_seconds``: sessions read back from the
  store (after an eviction, or taken over from another replica), and how long each took;
- ``longllava_decode_batch``: sessions decoded together per forward.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
TOKENS = [1, 4, 16, 64, 144, 256, 512, 1024, 4096, 16384]
LAG = [0.5, 1.5, 2.5, 4.5, 8.5, 16.5, 32.5]
SECONDS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60]
BATCH = [1, 2, 4, 8, 16, 32, 64, 128]


class ReplicaMetrics:
    def __init__(self) -> None:
        self.latency = Histogram("longllava_step_latency_ms", "append or whole generation on the replica", LATENCY_MS, tag_keys=("op",))
        self.tokens = Histogram("longllava_step_tokens", "tokens a step added to the history", TOKENS, tag_keys=("op",))
        self.lag = Histogram("longllava_checkpoint_lag_steps", "acknowledged step minus durable step, at each reply", LAG)
        self.lag_total = Gauge("longllava_checkpoint_lag_steps_total", "acknowledged minus durable steps over resident sessions")
        self.resident = Gauge("longllava_sessions_resident", "sessions in memory")
        self.evicted = Counter("longllava_sessions_evicted", "sessions evicted from memory to the store")
        self.state_bytes = Gauge("longllava_state_bytes", "bytes of the resident sessions' state")
        self.restores = Counter("longllava_restores", "sessions restored from the store")
        self.restore_seconds = Histogram("longllava_restore_seconds", "time to restore one session", SECONDS)
        self.batch = Histogram("longllava_decode_batch", "sessions decoded together per forward", BATCH)

    def step(self, op: str, seconds: float, tokens: int, lag: int | None) -> None:
        """One append or generation; ``lag`` is its step minus the durable step, if known."""
        self.latency.observe(seconds * 1000, tags={"op": op})
        self.tokens.observe(tokens, tags={"op": op})
        if lag is not None:
            self.lag.observe(max(lag, 0))
