"""The training worker's state: the view model, optimizer, dedupe registry, and its job queue.

The control loop (server.py) calls `submit_train`, `submit_checkpoint`, `status` and `job`
from its thread and gets answers at once; one training thread runs the jobs in order. A
checkpoint job snapshots the weights between steps and writes them in a background thread,
so training (and vLLM) go on while the files are written.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import queue
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from pathlib import Path

from apollo_train.shared.config import Settings, default_state_dir
from worker import persist
from worker.examples import ExampleError, encode_example, eos_token_ids
from worker.hooks import RouterHooks
from worker.param_groups import make_optimizer, optimizer_state_bytes
from worker.registry import DedupeRegistry
from worker.trainer import Trainer

log = logging.getLogger("apollo_train.worker")
MAX_JOBS_KEPT = 1000


class RequestError(Exception):
    """Answered to the client with this HTTP status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class Job:
    id: str
    kind: str  # "train" | "checkpoint"
    payload: dict
    state: str = "queued"  # queued | running | done | failed
    created: float = dataclasses.field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    result: dict = dataclasses.field(default_factory=dict)

    def public(self) -> dict:
        out = {k: getattr(self, k) for k in ("id", "kind", "state", "created", "started", "finished", "error")}
        out["job_id"] = out.pop("id")
        return {**out, **self.result}


class TrainingService:
    def __init__(self, run_dir: str, settings: Settings, hooks: RouterHooks | None = None):
        self.run_dir = Path(run_dir)
        self.settings = settings
        self.hooks = hooks
        self.state = "starting"
        self.error: str | None = None
        self.warning: str | None = None
        self.counters = {"step": 0, "examples_trained": 0, "tokens_trained": 0}
        self.last_loss: float | None = None
        self.last_checkpoint: dict | None = None
        self.checkpoint_progress: dict | None = None
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=settings.queue_size)
        self.pending_keys: set[str] = set()
        self.lock = threading.Lock()
        self.writer: threading.Thread | None = None
        self.model = self.tokenizer = self.optimizer = self.trainer = self.registry = None
        self.model_path = None
        self.max_len = None
        self.eos_ids = None

    # ---------------------------------------------------------------- start-up (training thread)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="training", daemon=True)
        thread.start()
        return thread

    def _setup(self) -> None:
        from transformers import AutoTokenizer

        from worker.views import attach

        # waits for vLLM's export, then compares the views with vLLM's weights as they are now
        attached = attach(self.run_dir, timeout=600,
                          checksums=self.hooks.vllm_checksums if self.hooks is not None else None)
        self.model, self.model_path = attached.model, attached.model_path
        self.max_len = attached.metadata["max_model_len"]
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("the model's tokenizer has no chat template, and /train takes chat conversations: "
                             "serve a chat (instruct) model or add a chat template to its tokenizer")
        self.eos_ids = eos_token_ids(self.model_path, self.tokenizer)
        if self.settings.freeze_embeddings:
            # Their AdamW moments are most of APOLLO's state; see docs/learning-quality.md.
            for module in (self.model.get_input_embeddings(), self.model.get_output_embeddings()):
                if module is not None:
                    module.weight.requires_grad_(False)
        self.optimizer = make_optimizer(self.model, self.settings.optimizer, self.settings.learning_rate)
        self.state_dir = Path(self.settings.state_dir or default_state_dir(self.model_path))
        self.registry = DedupeRegistry(self.run_dir / "registry.journal")
        restored, self.warning = persist.restore(
            self.model, self.optimizer, self.registry, self.model_path, self.state_dir
        )
        self.counters.update(restored)
        if self.warning:
            log.warning("%s", self.warning)
        self.trainer = Trainer(
            self.model, self.optimizer, max_tokens_per_step=self.settings.max_tokens_per_step, hooks=self.hooks
        )

    def _run(self) -> None:
        try:
            self._setup()
        except Exception as exc:  # the reason is reported by every request from now on
            self.state, self.error = "error", str(exc) or type(exc).__name__
            log.error("training worker cannot start: %s", self.error)
            return
        self.state = "idle"
        log.info("training worker ready on %s (%s)", self.model_path, self.settings.optimizer)
        while True:
            job = self.queue.get()
            job.state, job.started = "running", time.time()
            try:
                if job.kind == "train":
                    self.state = "training"
                    self._train(job)
                    job.state = "done" if job.state == "running" else job.state
                    job.finished = time.time()
                else:
                    self._checkpoint(job)  # its writer thread finishes the job
            except Exception as exc:
                log.error("job %s failed:\n%s", job.id, traceback.format_exc())
                job.state, job.error, job.finished = "failed", str(exc) or type(exc).__name__, time.time()
            finally:
                with self.lock:
                    self.pending_keys.difference_update(job.payload.get("keys", ()))
                self.state = "checkpointing" if self._writing() else "idle"

    # ---------------------------------------------------------------- requests (control thread)

    def _require_ready(self) -> None:
        if self.state == "error":
            raise RequestError(503, f"training is unavailable: {self.error}")
        if self.state == "starting":
            raise RequestError(503, "training worker is starting (attaching to vLLM's weights); retry shortly")

    def submit_train(self, body: dict) -> dict:
        self._require_ready()
        examples = body.get("examples")
        if not isinstance(examples, list) or not examples:
            raise RequestError(400, "'examples' must be a non-empty list")
        epochs, lr, force = body.get("epochs", 1), body.get("lr"), bool(body.get("force", False))
        if not isinstance(epochs, int) or isinstance(epochs, bool) or not 1 <= epochs <= 1000:
            raise RequestError(400, "'epochs' must be an integer from 1 to 1000")
        if lr is not None and (
            not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0
        ):
            raise RequestError(400, "'lr' must be a positive number")
        encoded = []
        for i, ex in enumerate(examples):
            if not isinstance(ex, dict):
                raise RequestError(400, f"examples[{i}] must be an object with 'messages'")
            try:
                encoded.append(
                    encode_example(
                        self.tokenizer,
                        ex.get("messages"),
                        ex.get("strip") or (),
                        self.max_len,
                        eos_token_ids=self.eos_ids,
                        where=f"examples[{i}]",
                    )
                )
            except ExampleError as exc:
                raise RequestError(400, str(exc)) from None
        with self.lock:
            fresh, skipped, seen = [], 0, set()
            for e in encoded:
                dup = e.key in seen or (not force and (e.key in self.registry or e.key in self.pending_keys))
                seen.add(e.key)
                if dup:
                    skipped += 1
                else:
                    fresh.append(e)
            job = Job(
                uuid.uuid4().hex[:16],
                "train",
                {"encoded": fresh, "epochs": epochs, "lr": lr, "keys": [e.key for e in fresh]},
            )
            job.result = {"accepted": len(fresh), "skipped_duplicates": skipped, "losses": [], "steps": 0}
            if not fresh:
                job.state, job.finished = "done", time.time()
                self._remember(job)
            else:
                self._enqueue(job)
                self.pending_keys.update(job.payload["keys"])
        return {"job_id": job.id, "accepted": len(fresh), "skipped_duplicates": skipped, "state": job.state}

    def submit_checkpoint(self, body: dict) -> dict:
        self._require_ready()
        path = body.get("path")
        if path is not None:
            if not isinstance(path, str) or not path.strip():
                raise RequestError(400, "'path' must be a non-empty string")
            target = Path(path).expanduser()
            if not target.is_absolute():
                raise RequestError(400, f"'path' must be absolute, got {path!r}")
            if target.exists() and not target.is_dir():
                raise RequestError(400, f"'path' {path} exists and is not a directory")
            path = str(target)
        job = Job(uuid.uuid4().hex[:16], "checkpoint", {"path": path})
        with self.lock:
            self._enqueue(job)
        return {"job_id": job.id, "state": job.state}

    def job(self, job_id) -> dict:
        job = self.jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise RequestError(404, f"unknown job id {job_id!r}")
        return job.public()

    def status(self) -> dict:
        opt = None
        if self.optimizer is not None:
            group = next((g for g in self.optimizer.param_groups if g.get("low_rank")), {})
            opt = {
                "name": self.settings.optimizer,
                "rank": group.get("rank"),
                "lr": self.settings.learning_rate,
                "state_bytes": optimizer_state_bytes(self.optimizer),
            }
        return {
            "state": self.state,
            "error": self.error,
            "warning": self.warning,
            "model": self.model_path,
            **self.counters,
            "last_loss": self.last_loss,
            "queue": self.queue.qsize(),
            "optimizer": opt,
            "mode": "barrier" if self.settings.barrier else "hogwild",
            "last_checkpoint": self.last_checkpoint,
            "checkpoint_in_progress": self.checkpoint_progress,
            "registry_size": len(self.registry) if self.registry is not None else 0,
        }

    def _enqueue(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise RequestError(
                429, f"the training queue is full ({self.settings.queue_size} jobs); retry later"
            ) from None
        self._remember(job)

    def _remember(self, job: Job) -> None:
        self.jobs[job.id] = job
        while len(self.jobs) > MAX_JOBS_KEPT:
            self.jobs.popitem(last=False)

    # ---------------------------------------------------------------- jobs (training thread)

    def _train(self, job: Job) -> None:
        encoded, epochs, lr = job.payload["encoded"], job.payload["epochs"], job.payload["lr"]

        def on_step(i: int, loss: float) -> None:
            job.result["losses"].append(loss)
            job.result["steps"] = i + 1
            if math.isfinite(loss):
                self.last_loss = loss

        result = self.trainer.train(encoded, epochs=epochs, lr=lr, on_step=on_step)
        self.counters["step"] += result.steps - result.skipped_steps
        self.counters["tokens_trained"] += result.tokens
        job.result.update(tokens=result.tokens, skipped_steps=result.skipped_steps)
        if result.skipped_steps == result.steps:
            job.state = "failed"
            job.error = "every step had a non-finite loss or gradient; the weights were left unchanged"
            return
        self.registry.add(job.payload["keys"])
        self.counters["examples_trained"] += len(encoded)
        if result.skipped_steps:
            job.result["warning"] = f"{result.skipped_steps} step(s) had non-finite values and were skipped"

    def _writing(self) -> bool:
        return self.writer is not None and self.writer.is_alive()

    def _checkpoint(self, job: Job) -> None:
        self.state = "checkpointing"
        if self._writing():
            self.writer.join()  # one write at a time; training jobs behind this one wait
        progress = {"job_id": job.id, "bytes_written": 0, "bytes_total": None, "started": time.time()}
        self.checkpoint_progress = progress

        def on_progress(done: int, total: int) -> None:
            progress.update(bytes_written=done, bytes_total=total)

        ckpt_id, write = persist.save(
            model=self.model,
            optimizer=self.optimizer,
            registry_keys=list(self.registry),
            counters=dict(self.counters),
            model_path=self.model_path,
            state_dir=self.state_dir,
            target=job.payload["path"],
            progress=on_progress,
        )
        job.result["checkpoint_id"] = ckpt_id

        def run_write() -> None:
            # Lowest CPU priority for this thread (Linux nices threads one by one): the CPU time
            # the write needs should come from idle cycles, not from vLLM's.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            try:
                info = write()
                self.last_checkpoint = info
                job.result.update(path=info["path"], bytes=info["bytes"])
                job.state = "done"
            except Exception as exc:
                log.error("checkpoint %s failed:\n%s", ckpt_id, traceback.format_exc())
                job.state, job.error = "failed", f"checkpoint write failed: {exc}"
            finally:
                job.finished = time.time()
                self.checkpoint_progress = None
                if self.state == "checkpointing":
                    self.state = "idle"

        self.writer = threading.Thread(target=run_write, name="checkpoint-writer", daemon=True)
        self.writer.start()
