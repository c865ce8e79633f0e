"""Training metrics on vLLM's own `/metrics`, named in vLLM's style (`apollo_train:...`, label `model_name`).

The training worker pushes events (a step, a finished job, a written checkpoint, and with each a
snapshot of its gauges) over a one-way ZeroMQ socket to the supervising API-server process, which
records them here; nothing polls, on vLLM's event loop or elsewhere. The metrics live in
prometheus_client's default registry, which vLLM's `/metrics` exposes; with several API-server
processes vLLM runs prometheus_client's multiprocess mode, where only the supervising process
records (so counters are not counted twice) and gauges take the most recent value written.

Seconds since the last checkpoint: `time() - apollo_train:last_checkpoint_timestamp_seconds` (a
timestamp, as Prometheus recommends, since a gauge cannot count up between scrapes by itself).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STATES = ("starting", "idle", "training", "checkpointing", "restoring", "error")
_created: dict[str, object] = {}


def _metric(cls, name: str, doc: str, labels=("model_name",), **kwargs):
    """One metric per process (a second server object in the same process reuses it)."""
    if name not in _created:
        if cls is Gauge:
            kwargs.setdefault("multiprocess_mode", "mostrecent")
        _created[name] = cls(name, doc, list(labels), **kwargs)
    return _created[name]


class TrainingMetrics:
    def __init__(self, model_name: str):
        m = {"model_name": model_name}
        self.model_name = model_name
        self.steps = _metric(Counter, "apollo_train:optimizer_steps", "Optimizer steps taken").labels(**m)
        self.skipped_steps = _metric(Counter, "apollo_train:skipped_steps",
                                     "Steps that changed no weight (non-finite loss or updates)").labels(**m)
        self.examples = _metric(Counter, "apollo_train:examples_trained", "New examples trained").labels(**m)
        self.tokens = _metric(Counter, "apollo_train:tokens_trained",
                              "Answer tokens of new examples trained").labels(**m)
        self.tokens_computed = _metric(Counter, "apollo_train:tokens_computed",
                                       "Tokens every step computed on: prompts, answers and replayed examples, "
                                       "no padding (training throughput)").labels(**m)
        self.jobs = _metric(Counter, "apollo_train:jobs", "Finished jobs by kind and final state",
                            ("model_name", "kind", "state"))
        self.restarts = _metric(Counter, "apollo_train:worker_restarts", "Training worker restarts").labels(**m)
        self.loss = _metric(Gauge, "apollo_train:loss", "Loss of the last optimizer step").labels(**m)
        self.queue = _metric(Gauge, "apollo_train:queue_depth", "Jobs waiting").labels(**m)
        self.state = _metric(Gauge, "apollo_train:worker_state", "1 for the worker's current state",
                             ("model_name", "state"))
        self.state_bytes = _metric(Gauge, "apollo_train:optimizer_state_bytes", "Optimizer state size").labels(**m)
        self.replay = _metric(Gauge, "apollo_train:replay_buffer_size", "Examples in the replay buffer").labels(**m)
        self.eval_loss = _metric(Gauge, "apollo_train:eval_loss", "Loss of the drift guard's eval file").labels(**m)
        self.last_checkpoint = _metric(Gauge, "apollo_train:last_checkpoint_timestamp_seconds",
                                       "When the last checkpoint was written (Unix time)").labels(**m)
        self.step_seconds = _metric(Histogram, "apollo_train:step_duration_seconds", "Duration of an optimizer step",
                                    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)).labels(**m)
        self.job_seconds = _metric(Histogram, "apollo_train:job_duration_seconds", "Duration of a training job",
                                   buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)).labels(**m)
        self.checkpoint_seconds = _metric(Histogram, "apollo_train:checkpoint_duration_seconds",
                                          "Duration of a checkpoint write",
                                          buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900)).labels(**m)
        self.checkpoint_bytes = _metric(Histogram, "apollo_train:checkpoint_bytes", "Bytes of a checkpoint",
                                        buckets=tuple(2.0**k for k in range(20, 42, 2))).labels(**m)

    def record(self, event: dict) -> None:
        """One event from the worker (see worker/metrics.py for the kinds)."""
        kind = event.get("kind")
        if kind == "step":
            self.steps.inc()
            self.step_seconds.observe(event["seconds"])
            self.tokens_computed.inc(event.get("tokens", 0))
        elif kind == "job":
            self.jobs.labels(self.model_name, event["job"], event["state"]).inc()
            self.job_seconds.observe(event["seconds"])
            self.examples.inc(event.get("examples", 0))
            self.tokens.inc(event.get("tokens", 0))
            self.skipped_steps.inc(event.get("skipped_steps", 0))
        elif kind == "checkpoint":
            self.checkpoint_seconds.observe(event["seconds"])
            self.checkpoint_bytes.observe(event["bytes"])
        gauges = event.get("gauges") or {}
        for name, gauge in (("loss", self.loss), ("queue", self.queue), ("optimizer_state_bytes", self.state_bytes),
                            ("replay_size", self.replay), ("eval_loss", self.eval_loss),
                            ("last_checkpoint_time", self.last_checkpoint)):
            if gauges.get(name) is not None:
                gauge.set(gauges[name])
        if "state" in gauges:
            for state in STATES:
                self.state.labels(self.model_name, state).set(1 if gauges["state"] == state else 0)
