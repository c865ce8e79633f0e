"""The worker's front desk: every request the router forwards is answered here, at once.

    /train:              validate, bound by size -> the intake thread tokenizes, drops duplicates, queues
    /checkpoint:         check the target -> queue
    /checkpoint/restore: find the checkpoint -> queue ahead of every job; a running one stops after its step
    /train/cancel, /train/status, /checkpoints, /train/settings: answered from the shared state

Two threads: the control thread (server.py) calls the public methods and gets answers at once; the
intake thread tokenizes /train requests, so a large one never holds up the others. A request that
cannot fit is refused from its size alone, before any tokenizing. Nothing here imports torch: the
recipe (recipe.py, the training thread) owns the model, and the front desk asks it only for what the
status shows (`Recipe.describe`).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

from apollo_train.shared.answers import StatusAnswer
from apollo_train.shared.config import Settings
from apollo_train.shared.protocol import BadRequest, Busy, RequestError, Unavailable
from apollo_train.shared.schema import (
    CancelRequest,
    CheckpointRequest,
    RestoreRequest,
    SettingsRequest,
    TrainRequest,
    parse,
)
from worker import checkpoint_target
from worker.chat_tokens import ExampleError, encode_example
from worker.jobs import CheckpointWork, Job, RestoreWork, TrainWork

log = logging.getLogger("apollo_train.worker")
INTAKE_SIZE = 2  # /train requests waiting to be tokenized (each up to --train-max-request-bytes)

Respond = Callable[[dict | Exception], None]


class FrontDesk:
    def __init__(self, recipe):
        """`recipe`: rank 0's Recipe (the training thread's): its jobs, state, tokenizer, registry and settings."""
        self.recipe, self.jobs, self.state = recipe, recipe.jobs, recipe.state
        self.intake: queue.Queue[tuple[TrainRequest, Respond]] = queue.Queue(maxsize=INTAKE_SIZE)

    @property
    def settings(self) -> Settings:
        return self.recipe.settings

    def start(self) -> None:
        threading.Thread(target=self._intake_loop, name="intake", daemon=True).start()

    # ---------------------------------------------------------------- requests (control thread)

    def _require_ready(self) -> None:
        phase, error = self.state.phase, self.state.error
        if phase == "error":
            raise Unavailable(f"training is unavailable: {error}")
        if phase == "starting":
            raise Unavailable("training worker is starting (attaching to vLLM's weights); retry shortly")

    def submit_train(self, body: dict, respond: Respond) -> None:
        """Validate and bound now; tokenize in the intake thread, which answers through `respond`."""
        request = parse(TrainRequest, body)
        request.check_limits(self.settings)
        self._require_ready()
        self._check_sizes(request)
        try:
            self.intake.put_nowait((request, respond))
        except queue.Full:
            raise Busy(f"{INTAKE_SIZE} /train requests are being tokenized already; retry shortly") from None

    def _check_sizes(self, request: TrainRequest) -> None:
        """Refuse, from its size alone, an example that cannot fit the served context (every token is at
        most `max_token_bytes` bytes of text, so a longer text has more tokens than the limit), and a job
        whose examples cannot fit --train-max-job-tokens: tokenizing megabytes takes seconds."""
        per_token, max_len = self.recipe.max_token_bytes, self.recipe.max_len
        least_total = 0
        for i, example in enumerate(request.examples):
            size = sum(len(m.content.encode()) for m in example.messages)
            least = size // per_token
            if max_len and least > max_len:
                raise BadRequest(f"examples[{i}] is {size:,} bytes of text, at least {least:,} tokens: more than the "
                                 f"limit of {max_len} tokens (the served --max-model-len); shorten it")
            least_total += least
        if least_total * request.epochs > self.settings.max_job_tokens:
            raise BadRequest(f"this job is at least {least_total:,} tokens x {request.epochs} epochs, more than the "
                             f"limit of {self.settings.max_job_tokens} (--train-max-job-tokens); split it into "
                             f"smaller jobs")

    def submit_checkpoint(self, body: dict) -> dict:
        request = parse(CheckpointRequest, body)
        self._require_ready()
        target = checkpoint_target.resolve(request.path, self.recipe.checkpoint_root, Path(self.recipe.model_path))
        job = Job.of(CheckpointWork(target))
        self.jobs.put(job)
        self.recipe.report("gauges")
        return {"job_id": job.id, "state": job.state, "path": str(target.path)}

    def checkpoints(self) -> dict:
        self._require_ready()
        return {"checkpoints": checkpoint_target.listing(self.recipe.checkpoint_root, Path(self.recipe.model_path))}

    def submit_restore(self, body: dict) -> dict:
        """Queue a restore ahead of every queued job; a running training job stops after its step."""
        request = parse(RestoreRequest, body)
        self._require_ready()
        path = checkpoint_target.find(request.checkpoint, self.recipe.checkpoint_root, Path(self.recipe.model_path))
        job = Job.of(RestoreWork(path))
        self.jobs.put(job, first=True)
        running = self.recipe.current
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
        if changes.get("step_in_backward") is False and self.recipe.tensor_parallel_size > 1:
            raise BadRequest(f"at tensor parallel size {self.recipe.tensor_parallel_size} parameters are stepped "
                             f"inside the backward pass; step_in_backward cannot be turned off")
        self.recipe.apply_settings(dataclasses.replace(self.settings, **changes))
        if changes:
            log.info("settings changed: %s", changes)
        return {k: getattr(self.settings, k) for k in SettingsRequest.model_fields}

    def cancel(self, body: dict) -> dict:
        job = self.jobs.cancel(parse(CancelRequest, body).job_id)
        if job.state == "cancelled":  # it never ran: its examples may be posted again
            self.state.release_keys(job.keys)
            self.recipe.report_job(job)
        return job.public()

    def job(self, body: dict) -> dict:
        job_id = body.get("job_id")
        if not isinstance(job_id, str):
            raise BadRequest("'job_id' must be a string")
        return self.jobs.job(job_id).public()

    def status(self) -> dict:
        state = self.state.read()
        settings = self.settings
        return StatusAnswer(
            state=state["phase"], error=state["error"], warning=state["warning"], **state["counters"],
            last_loss=state["last_loss"], queue=len(self.jobs),
            tokenizing=self.intake.unfinished_tasks,  # waiting, and the one being tokenized
            mode="barrier" if settings.barrier else "hogwild", busy_share=settings.busy_share,
            step_in_backward=settings.step_in_backward, checkpoint_root=settings.checkpoint_root,
            last_checkpoint=state["last_checkpoint"], checkpoint_in_progress=state["checkpoint_progress"],
            eval_loss=state["eval_loss"], **self.recipe.describe(),
        ).model_dump(exclude={"worker"})

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
        recipe = self.recipe
        encoded = []
        for i, example in enumerate(request.examples):
            try:
                encoded.append(encode_example(recipe.tokenizer, example, recipe.max_len, eos_token_ids=recipe.eos_ids,
                                              where=f"examples[{i}]"))
            except ExampleError as exc:
                raise BadRequest(str(exc)) from None
        tokens = sum(len(e.input_ids) for e in encoded)
        if tokens * request.epochs > self.settings.max_job_tokens:
            raise BadRequest(f"this job is {tokens} tokens x {request.epochs} epochs = {tokens * request.epochs} token "
                             f"passes, more than the limit of {self.settings.max_job_tokens} "
                             f"(--train-max-job-tokens); split it into smaller jobs")
        with self.state.lock:  # against the training thread, which records trained keys and releases pending ones
            fresh, skipped, seen = [], 0, set()
            for e in encoded:
                known = e.key in recipe.registry or e.key in self.state.pending_keys
                dup = e.key in seen or (not request.force and known)
                seen.add(e.key)
                if dup:
                    skipped += 1
                else:
                    fresh.append(e)
            job = Job.of(TrainWork(encoded=fresh, epochs=request.epochs, lr=request.lr, keys=[e.key for e in fresh]))
            job.result = {"accepted": len(fresh), "skipped_duplicates": skipped, "losses": [], "steps": 0}
            if fresh:
                self.jobs.put(job)
                self.state.pending_keys.update(job.keys)
            else:
                job.finish("done")
                self.jobs.remember(job)
        recipe.report("gauges")
        return {"job_id": job.id, "accepted": len(fresh), "skipped_duplicates": skipped, "state": job.state}
