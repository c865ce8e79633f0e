"""The online training recipe: what happens to a request, from examples to weights vLLM serves.

    start:       attach views of vLLM's weights, load the tokenizer, build the optimizer, restore
                 the training state that belongs to the served weights
    /train:      validate -> tokenize (intake thread) -> drop duplicates -> queue a job
    train job:   Trainer.train over the job's examples -> record them in the dedupe registry
    /checkpoint: check the target -> queue a job -> snapshot between steps -> write in the background
    /checkpoint/restore: find the checkpoint -> ahead of the queue (a running job stops after its
                 step) -> its weights into the served tensors, its optimizer, registry and replay buffer

Each step replays earlier examples beside the new ones (replay.py); with an eval file, the eval loss is
measured after each job and a job that raised it too much is rolled back (drift.py).

Three threads: the control thread (server.py) calls the `submit_*`, `status`, `job` and `cancel`
methods and gets answers at once; the intake thread tokenizes /train requests, so a large one never
holds up the others; the training thread runs jobs in order (jobs.py). A checkpoint's files are
written by a writer thread at the lowest priority while training goes on.

Under tensor parallelism this is rank 0: it alone serves requests, and its training thread announces
to the other ranks whatever they must take part in (tensor_parallel/follower.py).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from apollo_train.shared.config import Settings, resolve_model_dir
from apollo_train.shared.protocol import BadRequest, Busy, RequestError, Unavailable
from apollo_train.shared.schema import (
    CancelRequest,
    CheckpointRequest,
    RestoreRequest,
    SettingsRequest,
    TrainRequest,
    parse,
)
from apollo_train.shared.serving_load import serving_load
from worker import checkpoint_target, drift, memory, persist
from worker.checkpoint import Abandoned
from worker.examples import ExampleError, encode_example, eos_token_ids
from worker.governor import Governor
from worker.hooks import RouterHooks
from worker.jobs import FINISHED, Cancelled, Job, JobQueue
from worker.metrics import MetricsPush
from worker.param_groups import optimizer_state_bytes
from worker.registry import DedupeRegistry
from worker.replay import ReplayBuffer
from worker.tensor_parallel.full_weights import AllRanks
from worker.tensor_parallel.lockstep import Group
from worker.training_setup import attach_rank, make_trainer

log = logging.getLogger("apollo_train.worker")
INTAKE_SIZE = 2  # /train requests waiting to be tokenized (each up to --train-max-request-bytes)
CHECKPOINT_GRACE_S = 20.0  # on shutdown, a checkpoint write that finishes within this is kept

Respond = Callable[[dict | Exception], None]


class TrainingService:
    def __init__(self, run_dir: str, settings: Settings, hooks: RouterHooks | None = None,
                 metrics: MetricsPush | None = None):
        self.run_dir = Path(run_dir)
        self.settings = settings
        self.hooks = hooks
        self.metrics = metrics
        self.state = "starting"
        self.error: str | None = None
        self.warning: str | None = None
        self.counters = {"step": 0, "examples_trained": 0, "tokens_trained": 0, "input_tokens": 0}
        self.last_loss: float | None = None
        self.last_checkpoint: dict | None = None
        self.checkpoint_progress: dict | None = None
        self.jobs = JobQueue(settings.queue_size, self.run_dir / "jobs.journal")
        self.intake: queue.Queue[tuple[TrainRequest, Respond]] = queue.Queue(maxsize=INTAKE_SIZE)
        self.pending_keys: set[str] = set()
        self.lock = threading.Lock()  # the registry and pending_keys, between intake and training
        self.writer: threading.Thread | None = None
        self.abandon = threading.Event()
        self.model = self.tokenizer = self.optimizer = self.trainer = self.registry = self.replay = None
        self.model_path = None
        self.rank = self.all_ranks = None  # this rank's group and shards; every rank's weights (tensor parallel)
        self.tensor_parallel_size = 1
        self.current: Job | None = None  # the job the training thread runs
        self.eval_examples = None
        self.eval_loss: float | None = None
        self.load = serving_load(run_dir)  # vLLM's requests in flight, written by the router
        self.governor: Governor | None = None

    # ---------------------------------------------------------------- start-up (training thread)

    def start(self) -> None:
        threading.Thread(target=self._run, name="training", daemon=True).start()
        threading.Thread(target=self._intake_loop, name="intake", daemon=True).start()

    def _setup(self) -> None:
        from transformers import AutoTokenizer

        # waits for vLLM's export, then compares the views with vLLM's weights as they are now
        self.rank = attach_rank(self.run_dir, 0, self.settings,
                                checksums=self.hooks.vllm_checksums if self.hooks is not None else None)
        attached = self.rank.attached
        self.model = attached.model
        self.model_path = str(resolve_model_dir(attached.metadata["model_path"]))
        self.max_len = attached.metadata["max_model_len"]
        self.tensor_parallel_size = attached.metadata["tp_size"]
        self.all_ranks = AllRanks(self.run_dir, self.tensor_parallel_size) if self.rank.group is not None else None
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("the model's tokenizer has no chat template, and /train takes chat conversations: "
                             "serve a chat (instruct) model or add a chat template to its tokenizer")
        self.eos_ids = eos_token_ids(self.model_path, self.tokenizer)
        self.governor = Governor(self.load.read, self.settings.busy_share, next(self.model.parameters()).device)
        self.trainer = make_trainer(self.rank, self.settings, self.hooks, self.governor)
        self.optimizer = self.trainer.optimizer
        self.state_dir = Path(self.settings.state_dir)
        self.checkpoint_root = Path(self.settings.checkpoint_root)
        self.checkpoint_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.registry = DedupeRegistry(self.run_dir / "registry.journal")
        self.replay = ReplayBuffer(self.settings.replay_size, self.run_dir / "replay.journal")
        restored, self.warning = persist.restore(
            self.model, self.optimizer, self.registry, self.replay, self.model_path, self.state_dir
        )
        self.counters.update(restored)
        self.warning = "; ".join(w for w in (self.warning, memory.check(self.model, self.optimizer, self.settings))
                                 if w) or None
        if self.warning:
            log.warning("%s", self.warning)
        if self.settings.eval_file:
            self.eval_examples = drift.read_eval_file(self.settings.eval_file, self.tokenizer, self.max_len,
                                                      self.eos_ids)
            self.eval_loss = drift.eval_loss(self.trainer, self.eval_examples)

    def _run(self) -> None:
        try:
            self._setup()
        except Exception as exc:  # the reason is reported by every request from now on
            self.state, self.error = "error", str(exc) or type(exc).__name__
            log.error("training worker cannot start: %s", self.error)
            return
        self.state = "idle"
        self._report("gauges", full=True)
        log.info("training worker ready on %s (%s)", self.model_path, self.settings.optimizer)
        while True:
            self.run_job(self.jobs.get())

    def run_job(self, job: Job) -> None:
        """Run one job to its end (training thread); whatever it raises ends the job, not the worker."""
        self.current = job
        out_of_memory = None
        try:
            if job.kind == "train":
                self.state = "training"
                self._train(job)
            elif job.kind == "restore":
                self.state = "restoring"
                self._restore(job)
            else:
                self.state = "checkpointing"
                self._checkpoint(job)  # its writer thread finishes the job
        except Cancelled:
            job.finish("cancelled", job.cancel_reason)
        except RequestError as exc:  # refused after checks every rank makes alike (a restore's)
            job.finish("failed", str(exc))
        except torch.OutOfMemoryError as exc:  # failed below, once the traceback's tensors are gone
            out_of_memory = exc.args[0] if exc.args else ""
        except Exception as exc:
            log.error("job %s failed:\n%s", job.id, traceback.format_exc())
            job.finish("failed", str(exc) or type(exc).__name__)
            if self.rank.group is not None:
                # the other ranks may be waiting in a collective this rank left: restart the group
                log.error("tensor-parallel ranks may be out of step after this failure; the group restarts")
                os._exit(1)
        finally:
            if out_of_memory is not None:
                self._fail_out_of_memory(job, out_of_memory)
            with self.lock:
                self.pending_keys.difference_update(job.payload.get("keys", ()))
            self.current = None
            self.state = "checkpointing" if self._writing() else "idle"
            if job.state in FINISHED:
                self._report_job(job)

    def _fail_out_of_memory(self, job: Job, message: str) -> None:
        """Free what the job took (its gradients; its activations went with the traceback), then fail it with
        the reason and the fix; the worker goes on with the next job."""
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        job.finish("failed", memory.out_of_memory(torch.OutOfMemoryError(message), self.model, self.optimizer,
                                                  self.settings))
        log.error("job %s: %s", job.id, job.error)
        if self.rank.group is not None:
            log.error("tensor-parallel ranks may be out of step after this failure; the group restarts")
            os._exit(1)

    # ---------------------------------------------------------------- requests (control thread)

    def _require_ready(self) -> None:
        if self.state == "error":
            raise Unavailable(f"training is unavailable: {self.error}")
        if self.state == "starting":
            raise Unavailable("training worker is starting (attaching to vLLM's weights); retry shortly")

    def submit_train(self, body: dict, respond: Respond) -> None:
        """Validate now; tokenize in the intake thread, which answers through `respond`."""
        request = parse(TrainRequest, body)
        request.check_limits(self.settings)
        self._require_ready()
        try:
            self.intake.put_nowait((request, respond))
        except queue.Full:
            raise Busy(f"{INTAKE_SIZE} /train requests are being tokenized already; retry shortly") from None

    def submit_checkpoint(self, body: dict) -> dict:
        request = parse(CheckpointRequest, body)
        self._require_ready()
        target = checkpoint_target.resolve(request.path, self.checkpoint_root, Path(self.model_path))
        job = Job("checkpoint", {"target": target})
        self.jobs.put(job)
        self._report("gauges")
        return {"job_id": job.id, "state": job.state, "path": str(target.path)}

    def checkpoints(self) -> dict:
        self._require_ready()
        return {"checkpoints": checkpoint_target.listing(self.checkpoint_root, Path(self.model_path))}

    def submit_restore(self, body: dict) -> dict:
        """Queue a restore ahead of every queued job; a running training job stops after its step."""
        request = parse(RestoreRequest, body)
        self._require_ready()
        path = checkpoint_target.find(request.checkpoint, self.checkpoint_root, Path(self.model_path))
        job = Job("restore", {"path": path})
        self.jobs.put(job, first=True)
        running = self.current
        if running is not None and running.kind == "train":
            running.cancel_requested = True
            running.cancel_reason = f"stopped after its step for the restore of {request.checkpoint} (job {job.id})"
        return {"job_id": job.id, "state": job.state, "path": str(path)}

    def update_settings(self, body: dict) -> dict:
        """Change the settings an operator may change while the server runs (SettingsRequest); the settings
        now in force."""
        request = parse(SettingsRequest, body)
        self._require_ready()
        changes = request.model_dump(exclude_none=True)
        if changes.get("step_in_backward") is False and self.tensor_parallel_size > 1:
            raise BadRequest(f"at tensor parallel size {self.tensor_parallel_size} parameters are stepped inside "
                             f"the backward pass; step_in_backward cannot be turned off")
        with self.lock:
            self.settings = dataclasses.replace(self.settings, **changes)
            self.governor.share = self.settings.busy_share
            self.trainer.step_in_backward = self.settings.step_in_backward
            if self.hooks is not None:
                self.hooks.barrier = self.settings.barrier
        if changes:
            log.info("settings changed: %s", changes)
        return {k: getattr(self.settings, k) for k in SettingsRequest.model_fields}

    def cancel(self, body: dict) -> dict:
        job = self.jobs.cancel(parse(CancelRequest, body).job_id)
        if job.state == "cancelled":  # it never ran: its examples may be posted again
            with self.lock:
                self.pending_keys.difference_update(job.payload.get("keys", ()))
            self._report_job(job)
        return job.public()

    def job(self, body: dict) -> dict:
        job_id = body.get("job_id")
        if not isinstance(job_id, str):
            raise BadRequest("'job_id' must be a string")
        return self.jobs.job(job_id).public()

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
            "queue": len(self.jobs),
            "tokenizing": self.intake.unfinished_tasks,  # waiting, and the one being tokenized
            "optimizer": opt,
            "mode": "barrier" if self.settings.barrier else "hogwild",
            "busy_share": self.settings.busy_share,
            "step_in_backward": self.settings.step_in_backward,
            "serving_requests": self.load.read(),
            "yielded_s": round(self.governor.yielded_s, 3) if self.governor is not None else 0.0,
            "tensor_parallel_size": self.tensor_parallel_size,
            "checkpoint_root": self.settings.checkpoint_root,
            "last_checkpoint": self.last_checkpoint,
            "checkpoint_in_progress": self.checkpoint_progress,
            "registry_size": len(self.registry) if self.registry is not None else 0,
            "replay_size": len(self.replay) if self.replay is not None else 0,
            "eval_loss": self.eval_loss,
            "gpu_memory": self._gpu_memory(),
        }

    def _gpu_memory(self) -> dict | None:
        """The worker's own GPU memory (above the shared weights, which vLLM allocated), and the estimate."""
        if self.model is None or not (device := next(self.model.parameters()).device).type == "cuda":
            return None
        return {"allocated_bytes": torch.cuda.memory_allocated(device),
                "peak_bytes": torch.cuda.max_memory_allocated(device),
                "estimate_bytes": memory.estimate(self.model, self.optimizer, self.settings)}

    # ---------------------------------------------------------------- intake (tokenizing thread)

    def _intake_loop(self) -> None:
        while True:
            request, respond = self.intake.get()
            try:
                respond(self._accept(request))
            except RequestError as exc:
                respond(exc)
            except Exception as exc:  # a bug, not the client's fault: answered, logged, and the thread lives
                log.error("intake failed:\n%s", traceback.format_exc())
                respond(exc)
            finally:
                self.intake.task_done()

    def _accept(self, request: TrainRequest) -> dict:
        """Tokenize, check the job's size, drop duplicates and queue the rest."""
        encoded = []
        for i, example in enumerate(request.examples):
            try:
                encoded.append(encode_example(self.tokenizer, example, self.max_len, eos_token_ids=self.eos_ids,
                                              where=f"examples[{i}]"))
            except ExampleError as exc:
                raise BadRequest(str(exc)) from None
        tokens = sum(len(e.input_ids) for e in encoded)
        if tokens * request.epochs > self.settings.max_job_tokens:
            raise BadRequest(f"this job is {tokens} tokens x {request.epochs} epochs = {tokens * request.epochs} token "
                             f"passes, more than the limit of {self.settings.max_job_tokens} "
                             f"(--train-max-job-tokens); split it into smaller jobs")
        with self.lock:
            fresh, skipped, seen = [], 0, set()
            for e in encoded:
                dup = e.key in seen or (not request.force and (e.key in self.registry or e.key in self.pending_keys))
                seen.add(e.key)
                if dup:
                    skipped += 1
                else:
                    fresh.append(e)
            job = Job("train", {"encoded": fresh, "epochs": request.epochs, "lr": request.lr,
                                "keys": [e.key for e in fresh]})
            job.result = {"accepted": len(fresh), "skipped_duplicates": skipped, "losses": [], "steps": 0}
            if fresh:
                self.jobs.put(job)
                self.pending_keys.update(job.payload["keys"])
            else:
                job.finish("done")
                self.jobs.remember(job)
        self._report("gauges")
        return {"job_id": job.id, "accepted": len(fresh), "skipped_duplicates": skipped, "state": job.state}

    # ---------------------------------------------------------------- jobs (training thread)

    def _train(self, job: Job) -> None:
        encoded, epochs, lr = job.payload["encoded"], job.payload["epochs"], job.payload["lr"]
        guard = self.settings.max_eval_loss_rise is not None
        if guard:
            self._announce(Group.SNAPSHOT)
        before = drift.Snapshot(self.model, self.optimizer) if guard else None

        last = [time.monotonic()]

        def on_step(i: int, loss: float, tokens: int) -> None:
            job.result["losses"].append(loss)
            job.result["steps"] = i + 1
            if math.isfinite(loss):
                self.last_loss = loss
            now = time.monotonic()
            self._report("step", seconds=now - last[0], tokens=tokens)
            last[0] = now
            if job.cancel_requested:
                raise Cancelled

        try:
            result = self.trainer.train(encoded, epochs=epochs, lr=lr, on_step=on_step, replay=self.replay,
                                        replay_ratio=self.settings.replay_ratio)
        except BaseException:  # cancelled, or failed: the steps before it stopped changed the weights
            self.counters["step"] += job.result["steps"]
            raise
        self.counters["input_tokens"] += result.input_tokens
        job.result.update(tokens=result.tokens, input_tokens=result.input_tokens, skipped_steps=result.skipped_steps,
                          skipped_params=result.skipped_params, replayed=result.replayed)
        if result.whole_model_reason:
            job.result["whole_model_step"] = result.whole_model_reason
        if result.skipped_steps == result.steps:
            job.finish("failed", "every step had a non-finite loss or gradient; the weights were left unchanged")
            return
        if self.eval_examples is not None and self._rolled_back(job, before):
            return
        self.counters["step"] += result.steps - result.skipped_steps
        self.counters["tokens_trained"] += result.tokens
        with self.lock:
            self.registry.add(job.payload["keys"])
        self.replay.add(encoded)
        self.counters["examples_trained"] += len(encoded)
        if result.skipped_steps or result.skipped_params:
            job.result["warning"] = (f"{result.skipped_steps} step(s) and {result.skipped_params} parameter "
                                     f"update(s) had non-finite values and were skipped")
        job.finish("done")

    def _rolled_back(self, job: Job, before: drift.Snapshot | None) -> bool:
        """Measure the eval loss; undo the job from `before` if it rose by more than the limit."""
        loss_before, loss_after = self.eval_loss, drift.eval_loss(self.trainer, self.eval_examples)
        job.result["eval_loss"] = {"before": loss_before, "after": loss_after}
        rise = loss_after - loss_before
        if before is None or not rise > self.settings.max_eval_loss_rise:
            self.eval_loss = loss_after
            self._announce(Group.FORGET)
            return False
        self._announce(Group.ROLLBACK)
        with self.trainer.writing_weights():
            before.restore(self.model, self.optimizer)
        job.result["rolled_back"] = {"eval_loss_before": loss_before, "eval_loss_after": loss_after,
                                     "rise": rise, "max_rise": self.settings.max_eval_loss_rise,
                                     "snapshot_bytes": before.nbytes}
        job.finish("rolled_back", f"the job raised the eval loss by {rise:.4f} nats, more than the "
                                  f"--train-max-eval-loss-rise of {self.settings.max_eval_loss_rise}; it was undone")
        return True

    def _restore(self, job: Job) -> None:
        self._announce(Group.RESTORE, str(job.payload["path"]))
        counters = persist.restore_live(
            model=self.model, optimizer=self.optimizer, registry=self.registry, replay=self.replay,
            checkpoint_dir=job.payload["path"], state_dir=self.state_dir, writing=self.trainer.writing_weights,
            boxes=self.rank.attached.boxes if self.rank.group is not None else None,
        )
        self.counters.update(counters)
        if self.eval_examples is not None:
            self.eval_loss = drift.eval_loss(self.trainer, self.eval_examples)
        job.result.update(path=str(job.payload["path"]), **counters)
        job.finish("done")

    def _announce(self, op: str, *args) -> None:
        """Tensor parallelism: the other ranks do `op` too (tensor_parallel/follower.py)."""
        if self.rank.group is not None:
            self.rank.group.announce(op, *args)

    def _writing(self) -> bool:
        return self.writer is not None and self.writer.is_alive()

    def _checkpoint(self, job: Job) -> None:
        if self._writing():
            self.writer.join()  # one write at a time; training jobs behind this one wait
        progress = {"job_id": job.id, "bytes_written": 0, "bytes_total": None, "started": time.time()}
        self.checkpoint_progress = progress

        def on_progress(done: int, total: int) -> None:
            progress.update(bytes_written=done, bytes_total=total)

        with self.lock:
            registry_keys = list(self.registry)
        ckpt_id, write = persist.save(
            model=self.model,
            weights=self.all_ranks.snapshot(self.model) if self.all_ranks is not None else None,
            optimizer=self.optimizer,
            registry_keys=registry_keys,
            replay=self.replay.dumps(),
            counters=dict(self.counters),
            model_path=self.model_path,
            state_dir=self.state_dir,
            target=job.payload["target"],
            root=self.checkpoint_root,
            keep=self.settings.keep_checkpoints,
            progress=on_progress,
            should_stop=self.abandon.is_set,
        )
        job.result["checkpoint_id"] = ckpt_id

        def run_write() -> None:
            # Lowest CPU priority for this thread (Linux nices threads one by one): the CPU time
            # the write needs should come from idle cycles, not from vLLM's.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            try:
                t0 = time.monotonic()
                info = write()
                self.last_checkpoint = info
                job.result.update(path=info["path"], bytes=info["bytes"])
                job.finish("done")
                self._report("checkpoint", seconds=time.monotonic() - t0, bytes=info["bytes"])
            except Abandoned as exc:
                job.finish("failed", str(exc))
            except Exception as exc:
                log.error("checkpoint %s failed:\n%s", ckpt_id, traceback.format_exc())
                job.finish("failed", f"checkpoint write failed: {exc}")
            finally:
                self.checkpoint_progress = None
                if self.state == "checkpointing":
                    self.state = "idle"
                self._report_job(job)

        self.writer = threading.Thread(target=run_write, name="checkpoint-writer")
        self.writer.start()

    # ---------------------------------------------------------------- metrics (any thread)

    def _report(self, kind: str, full: bool = False, **fields) -> None:
        """An event for /metrics with the gauges now (`full`: the optimizer's state size too, which walks it)."""
        if self.metrics is None:
            return
        gauges = {"state": self.state, "queue": len(self.jobs), "loss": self.last_loss,
                  "replay_size": len(self.replay) if self.replay is not None else None, "eval_loss": self.eval_loss,
                  "last_checkpoint_time": (self.last_checkpoint or {}).get("time")}
        if full and self.optimizer is not None:
            gauges["optimizer_state_bytes"] = optimizer_state_bytes(self.optimizer)
        self.metrics.send(kind, gauges=gauges, **fields)

    def _report_job(self, job: Job) -> None:
        done = job.state == "done" and job.kind == "train"
        self._report("job", full=True, job=job.kind, state=job.state,
                     seconds=(job.finished or time.time()) - (job.started or job.created),
                     examples=job.result.get("accepted", 0) if done else 0,
                     tokens=job.result.get("tokens", 0) if done else 0,
                     skipped_steps=job.result.get("skipped_steps", 0))

    # ---------------------------------------------------------------- shutdown (main thread)

    def shutdown(self, grace: float = CHECKPOINT_GRACE_S) -> None:
        finish_or_abandon(self.writer, self.abandon, grace)


def finish_or_abandon(writer: threading.Thread | None, abandon: threading.Event, grace: float) -> None:
    """A checkpoint being written is finished if it can be within `grace` seconds, else abandoned (its
    writer checks `abandon`); either way the previous checkpoint stays complete and loadable."""
    if writer is None or not writer.is_alive():
        return
    log.info("waiting up to %.0f s for the checkpoint being written", grace)
    writer.join(grace)
    if writer.is_alive():
        abandon.set()
        writer.join()
        log.info("checkpoint write abandoned; the previous checkpoint is intact")
