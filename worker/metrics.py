"""Metric events the worker pushes to the supervising API-server process (apollo_train/api/metrics.py).

One-way and fire-and-forget: a full or absent receiver drops events rather than slow training. Kinds:
`step` (seconds), `job` (job kind, final state, seconds, examples, tokens, skipped_steps), `checkpoint`
(seconds, bytes), `gauges` (only the snapshot); every event carries a snapshot of the worker's gauges.
"""

from __future__ import annotations

import threading

import zmq

from apollo_train.shared import protocol


class MetricsPush:
    def __init__(self, context: zmq.Context, address: str):
        self._lock = threading.Lock()  # the training, intake, writer and control threads all report
        self._socket = context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 1000)
        self._socket.connect(address)

    def send(self, kind: str, **fields) -> None:
        msg = protocol.pack(protocol.request(protocol.OP_METRICS, {"kind": kind, **fields}))
        with self._lock:
            try:
                self._socket.send(msg, zmq.NOBLOCK)
            except zmq.Again:
                pass  # nobody is listening, or it is behind: metrics are not worth a stall
