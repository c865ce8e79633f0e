"""Entry point of the training worker process: `python -m worker --run-dir DIR --settings JSON [--rank R]`.

The router inside vLLM's API server starts it (and restarts it if it dies), from the private run
dir; it binds the control socket there and connects to the router's hooks socket. SIGTERM (or the
API server going away) stops it cleanly: a checkpoint being written is finished or abandoned, never
left half-done.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

import torch
import zmq

from apollo_train.shared.config import Settings
from apollo_train.shared.cpu import enable_amx
from apollo_train.shared.protocol import control_address, hooks_address, metrics_address
from worker.front_desk import FrontDesk
from worker.hooks import RouterHooks
from worker.jobs import JobQueue
from worker.metrics import MetricsPush
from worker.recipe import Recipe
from worker.server import serve
from worker.tensor_parallel.follower import follow

CPU_NICE = 10


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--settings", required=True, help="Settings as JSON (apollo_train.shared.config)")
    parser.add_argument("--rank", type=int, default=0, help="tensor-parallel rank (0: the worker the router talks to)")
    args = parser.parse_args(argv)
    name = "worker" if args.rank == 0 else f"rank {args.rank}"
    logging.basicConfig(level=logging.INFO, format=f"(apollo-train {name}) %(levelname)s %(message)s")
    settings = Settings.from_json(args.settings)
    if not torch.cuda.is_available():
        # vLLM computes on the same cores: serving comes first, training takes what is left.
        # Set before torch starts its thread pool, whose threads inherit it.
        os.nice(CPU_NICE)
    enable_amx()
    if args.rank > 0:
        follow(args.run_dir, args.rank, settings)
        return
    context = zmq.Context()
    control = context.socket(zmq.ROUTER)
    control.setsockopt(zmq.LINGER, 0)
    control.bind(control_address(args.run_dir))
    hooks = RouterHooks(context, hooks_address(args.run_dir), args.run_dir, settings.barrier)
    jobs = JobQueue(settings.queue_size, Path(args.run_dir) / "jobs.journal")
    recipe = Recipe(args.run_dir, 0, settings, hooks, MetricsPush(context, metrics_address(args.run_dir)), jobs)
    desk = FrontDesk(recipe)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=recipe.run, name="training", daemon=True).start()
    desk.start()
    serve(desk, control, stop)
    recipe.shutdown()


if __name__ == "__main__":
    main()
