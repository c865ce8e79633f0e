"""The online training recipe that every training rank runs: from a queued job to the weights vLLM serves.

    setup:       attach views of vLLM's weights, build the optimizer and trainer, restore the training
                 state that belongs to the served weights (rank 0 also: tokenizer, registry, replay, eval)
    train job:   Trainer.train over the job's examples, replayed ones beside them -> the drift guard
                 (with an eval file) keeps or rolls back the job -> the examples enter the registry
    checkpoint:  snapshot between steps -> a writer thread writes it at the lowest priority
    restore:     a checkpoint's weights into the served tensors, its optimizer, registry and replay buffer

Rank 0 (the worker the router talks to) runs the jobs its front desk queues (front_desk.py). Under
tensor parallelism, the other ranks take part in whatever touches the model: rank 0 `call`s a group
operation (a method marked `@group_op`), which every rank then runs on its own shard; the others run
`follow()`, which receives the calls. A new group operation is one method here.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import threading
import time
import traceback
from pathlib import Path

import torch

from apollo_train.shared.config import Settings, resolve_model_dir
from apollo_train.shared.protocol import Conflict, RequestError
from apollo_train.shared.serving_load import serving_load
from worker import drift, memory, persist
from worker.chat_tokens import eos_token_ids
from worker.checkpoint import Abandoned
from worker.governor import Governor
from worker.jobs import Cancelled, Job, JobQueue, TrainWork
from worker.metrics import MetricsPush
from worker.param_groups import optimizer_state_bytes
from worker.registry import DedupeRegistry
from worker.replay import ReplayBuffer
from worker.state import WorkerState
from worker.tensor_parallel.full_weights import AllRanks
from worker.tensor_parallel.lockstep import StepNotTaken
from worker.trainer import StepHooks
from worker.training_setup import Rank, attach_rank, make_trainer

log = logging.getLogger("apollo_train.worker")
CHECKPOINT_GRACE_S = 20.0  # on shutdown, a checkpoint write that finishes within this is kept

GROUP_OPS: dict[str, object] = {}


def group_op(method):
    """Marks a Recipe method that every tensor-parallel rank runs when rank 0 calls it (`Recipe.call`)."""
    GROUP_OPS[method.__name__] = method
    return method


class Recipe:
    def __init__(self, run_dir: str | os.PathLike, rank: int, settings: Settings, hooks: StepHooks | None = None,
                 metrics: MetricsPush | None = None, jobs: JobQueue | None = None):
        """Rank 0 gets the router's `hooks`, the `metrics` channel and the `jobs` its front desk queues."""
        self.run_dir, self.rank_index, self.settings = Path(run_dir), rank, settings
        self.hooks, self.metrics, self.jobs = hooks, metrics, jobs
        self.state = WorkerState()
        self.load = serving_load(run_dir)  # vLLM's requests in flight, written by the router
        self.me: Rank | None = None
        self.model = self.optimizer = self.trainer = self.governor = self.tokenizer = None
        self.registry, self.replay = DedupeRegistry(None), ReplayBuffer(0)  # rank 0's are journaled (setup)
        self.model_path = self.max_len = self.eos_ids = self.all_ranks = self.eval_examples = None
        self.max_token_bytes = 1
        self.tensor_parallel_size = 1
        self.snapshot: drift.Snapshot | None = None  # the drift guard's, while a job runs
        self.current: Job | None = None  # the job the training thread runs
        self.writer: threading.Thread | None = None
        self.abandon = threading.Event()

    @property
    def group(self):
        return self.me.group if self.me is not None else None

    @property
    def checkpoint_root(self) -> Path:
        return Path(self.settings.checkpoint_root)

    # ---------------------------------------------------------------- start-up

    def setup(self) -> None:
        """Attach to vLLM's weights (waiting for its export; rank 0 compares them with vLLM's own
        checksums), build the optimizer and trainer, restore the training state of the served weights."""
        checksums = self.hooks.vllm_checksums if self.rank_index == 0 and self.hooks is not None else None
        self.me = attach_rank(self.run_dir, self.rank_index, self.settings, checksums=checksums)
        metadata = self.me.attached.metadata
        self.model = self.me.attached.model
        self.model_path = str(resolve_model_dir(metadata["model_path"]))
        self.tensor_parallel_size = metadata["tp_size"]
        if self.rank_index == 0:
            self._setup_front()
        self.governor = (Governor(self.load.read, self.settings.busy_share, next(self.model.parameters()).device)
                         if self.rank_index == 0 else None)
        self.trainer = make_trainer(self.me, self.settings, self.hooks, self.governor)
        self.optimizer = self.trainer.optimizer
        if self.rank_index == 0:
            self.checkpoint_root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.registry = DedupeRegistry(self.run_dir / "registry.journal")
            self.replay = ReplayBuffer(self.settings.replay_size, self.run_dir / "replay.journal")
            self.all_ranks = AllRanks(self.run_dir, self.tensor_parallel_size) if self.group is not None else None
        # every rank restores the optimizer state (the ranks' states are identical); rank 0 keeps the rest
        counters, warning = persist.restore(self.model, self.optimizer, self.registry, self.replay, self.model_path,
                                            Path(self.settings.state_dir))
        warning = "; ".join(w for w in (warning, memory.check(self.model, self.optimizer, self.settings)) if w) or None
        if warning:
            log.warning("%s", warning)
        self.state.update(warning=warning)
        self.state.count(**counters)
        if self.rank_index == 0 and self.settings.eval_file:
            self.eval_examples = drift.read_eval_file(self.settings.eval_file, self.tokenizer, self.max_len,
                                                      self.eos_ids)
            self.state.update(eval_loss=self.eval_loss())

    def _setup_front(self) -> None:
        """What rank 0's front desk needs: the tokenizer, the context length, the longest token."""
        from transformers import AutoTokenizer

        self.max_len = self.me.attached.metadata["max_model_len"]
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("the model's tokenizer has no chat template, and /train takes chat conversations: "
                             "serve a chat (instruct) model or add a chat template to its tokenizer")
        self.eos_ids = eos_token_ids(self.model_path, self.tokenizer)
        # the most bytes of text one token can stand for (a byte-level token is one character a byte; added
        # tokens are matched whole), doubled against normalizers that shorten text
        self.max_token_bytes = 2 * max(len(t.encode()) for t in self.tokenizer.get_vocab())

    def apply_settings(self, settings: Settings) -> None:
        """Settings changed live (POST /train/settings): the governor's share, the barrier, the step mode."""
        self.settings = settings
        self.governor.share = settings.busy_share
        self.trainer.step_in_backward = settings.step_in_backward
        if self.hooks is not None:
            self.hooks.barrier = settings.barrier

    # ---------------------------------------------------------------- group operations

    def call(self, op: str, *args):
        """Run group operation `op` here and, under tensor parallelism, on every other rank (rank 0 only)."""
        if self.group is not None:
            self.group.announce(op, *args)
        return GROUP_OPS[op](self, *args)

    def follow(self) -> None:
        """A rank other than 0: run the group operations rank 0 calls, until stopped."""
        while True:
            op, args = self.group.receive()
            try:
                GROUP_OPS[op](self, *args)
            except (StepNotTaken, Conflict) as exc:  # rank 0 meets the same and reports it with the job
                log.warning("rank %d: %s", self.rank_index, exc)

    @group_op
    def train_step(self, tensors: list[torch.Tensor], lrs: list[float]) -> tuple[float, bool, int]:
        return self.trainer.step_batch(tensors, lrs)

    @group_op
    def batch_loss(self, *tensors: torch.Tensor) -> float:
        return self.trainer.batch_loss(*tensors)

    @group_op
    def take_snapshot(self) -> None:
        self.snapshot = drift.Snapshot(self.model, self.optimizer)

    @group_op
    def rollback(self) -> None:
        with self.trainer.writing_weights():
            self.snapshot.restore(self.model, self.optimizer)
        self.snapshot = None

    @group_op
    def forget_snapshot(self) -> None:
        self.snapshot = None

    @group_op
    def restore_weights(self, checkpoint_dir: str) -> dict:
        """A checkpoint's weights (this rank's boxes of them), optimizer state, registry and replay buffer
        (rank 0's; the others hold none); its counters."""
        return persist.restore_live(
            model=self.model, optimizer=self.optimizer, registry=self.registry, replay=self.replay,
            checkpoint_dir=Path(checkpoint_dir), state_dir=Path(self.settings.state_dir),
            writing=self.trainer.writing_weights, boxes=self.me.attached.boxes if self.group is not None else None,
        )

    def eval_loss(self) -> float:
        return drift.eval_loss(lambda *t: self.call("batch_loss", *(x.cpu() for x in t)), self.eval_examples,
                               self.settings.max_tokens_per_step)

    # ---------------------------------------------------------------- jobs (rank 0's training thread)

    def run(self) -> None:
        """Rank 0's training thread: set up, then run jobs in order, for ever."""
        try:
            self.setup()
        except Exception as exc:  # the reason is reported by every request from now on
            error = str(exc) or type(exc).__name__
            self.state.update(phase="error", error=error)
            log.error("training worker cannot start: %s", error)
            return
        self.state.update(phase="idle")
        self.report("gauges", full=True)
        log.info("training worker ready on %s (%s)", self.model_path, self.settings.optimizer)
        while True:
            self.run_job(self.jobs.get())

    def run_job(self, job: Job) -> None:
        """Run one job to its end; whatever it raises ends the job, not the worker."""
        self.current = job
        out_of_memory = None
        try:
            if job.kind == "train":
                self.state.update(phase="training")
                self._train(job)
            elif job.kind == "restore":
                self.state.update(phase="restoring")
                self._restore(job)
            else:
                self.state.update(phase="checkpointing")
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
            self._restart_group_if_out_of_step()
        finally:
            if out_of_memory is not None:
                self._fail_out_of_memory(job, out_of_memory)
            self.state.release_keys(job.keys)
            self.current = None
            self.state.update(phase="checkpointing" if self._writing() else "idle")
            if job.finished:
                self.report_job(job)

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
        self._restart_group_if_out_of_step()

    def _restart_group_if_out_of_step(self) -> None:
        """Tensor parallelism: after an unexpected failure the other ranks may wait in a collective this rank
        left; exiting restarts the group (the supervisor restarts every rank together)."""
        if self.group is not None:
            log.error("tensor-parallel ranks may be out of step after this failure; the group restarts")
            os._exit(1)

    def _train(self, job: Job) -> None:
        work: TrainWork = job.work
        guard = self.settings.max_eval_loss_rise is not None
        if guard:
            self.call("take_snapshot")
        last = [time.monotonic()]

        def on_step(i: int, loss: float, tokens: int) -> None:
            job.result["losses"].append(loss)
            job.result["steps"] = i + 1
            if math.isfinite(loss):
                self.state.update(last_loss=loss)
            now = time.monotonic()
            self.report("step", seconds=now - last[0], tokens=tokens)
            last[0] = now
            if job.cancel_requested:
                raise Cancelled

        try:
            result = self.trainer.train(work.encoded, epochs=work.epochs, lr=work.lr, on_step=on_step,
                                        replay=self.replay, replay_ratio=self.settings.replay_ratio,
                                        step=lambda tensors, lrs: self.call("train_step", tensors, lrs))
        except BaseException:  # cancelled, or failed: the steps before it stopped changed the weights
            self.state.count(step=job.result["steps"])
            raise
        self.state.count(input_tokens=result.input_tokens)
        job.result.update(tokens=result.tokens, input_tokens=result.input_tokens, skipped_steps=result.skipped_steps,
                          skipped_params=result.skipped_params, replayed=result.replayed)
        if result.whole_model_reason:
            job.result["whole_model_step"] = result.whole_model_reason
        if result.skipped_steps == result.steps:
            job.finish("failed", "every step had a non-finite loss or gradient; the weights were left unchanged")
            return
        if self.eval_examples is not None and self._rolled_back(job, guard):
            return
        self.state.count(step=result.steps - result.skipped_steps, tokens_trained=result.tokens,
                         examples_trained=len(work.encoded))
        with self.state.lock:  # against the front desk's dedupe
            self.registry.add(work.keys)
        self.replay.add(work.encoded)
        if result.skipped_steps or result.skipped_params:
            job.result["warning"] = (f"{result.skipped_steps} step(s) and {result.skipped_params} parameter "
                                     f"update(s) had non-finite values and were skipped")
        job.finish("done")

    def _rolled_back(self, job: Job, guard: bool) -> bool:
        """Measure the eval loss; with the guard, undo the job if the loss rose by more than the limit."""
        loss_before, loss_after = self.state.eval_loss, self.eval_loss()
        job.result["eval_loss"] = {"before": loss_before, "after": loss_after}
        rise = loss_after - loss_before
        if not guard or not rise > self.settings.max_eval_loss_rise:
            self.state.update(eval_loss=loss_after)
            if guard:
                self.call("forget_snapshot")
            return False
        snapshot_bytes = self.snapshot.nbytes
        self.call("rollback")
        job.result["rolled_back"] = {"eval_loss_before": loss_before, "eval_loss_after": loss_after,
                                     "rise": rise, "max_rise": self.settings.max_eval_loss_rise,
                                     "snapshot_bytes": snapshot_bytes}
        job.finish("rolled_back", f"the job raised the eval loss by {rise:.4f} nats, more than the "
                                  f"--train-max-eval-loss-rise of {self.settings.max_eval_loss_rise}; it was undone")
        return True

    def _restore(self, job: Job) -> None:
        path = job.work.path
        counters = self.call("restore_weights", str(path))
        with self.state.lock:
            self.state.counters.update(counters)
        if self.eval_examples is not None:
            self.state.update(eval_loss=self.eval_loss())
        job.result.update(path=str(path), **counters)
        job.finish("done")

    def _writing(self) -> bool:
        return self.writer is not None and self.writer.is_alive()

    def _checkpoint(self, job: Job) -> None:
        if self._writing():
            self.writer.join()  # one write at a time; training jobs behind this one wait
        started = time.time()
        self.state.update(checkpoint_progress={"job_id": job.id, "bytes_written": 0, "bytes_total": None,
                                               "started": started})

        def on_progress(done: int, total: int) -> None:
            self.state.update(checkpoint_progress={"job_id": job.id, "bytes_written": done, "bytes_total": total,
                                                   "started": started})

        with self.state.lock:
            registry_keys, counters = list(self.registry), dict(self.state.counters)
        ckpt_id, write = persist.save(
            model=self.model,
            weights=self.all_ranks.snapshot(self.model) if self.all_ranks is not None else None,
            optimizer=self.optimizer,
            registry_keys=registry_keys,
            replay=self.replay.dumps(),
            counters=counters,
            model_path=self.model_path,
            state_dir=Path(self.settings.state_dir),
            target=job.work.target,
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
                self.state.update(last_checkpoint=info)
                job.result.update(path=info["path"], bytes=info["bytes"])
                job.finish("done")
                self.report("checkpoint", seconds=time.monotonic() - t0, bytes=info["bytes"])
            except Abandoned as exc:
                job.finish("failed", str(exc))
            except Exception as exc:
                log.error("checkpoint %s failed:\n%s", ckpt_id, traceback.format_exc())
                job.finish("failed", f"checkpoint write failed: {exc}")
            finally:
                with self.state.lock:
                    self.state.checkpoint_progress = None
                    if self.state.phase == "checkpointing":
                        self.state.phase = "idle"
                self.report_job(job)

        self.writer = threading.Thread(target=run_write, name="checkpoint-writer")
        self.writer.start()

    # ---------------------------------------------------------------- what the front desk and /metrics see

    def describe(self) -> dict:
        """The status fields only the recipe knows (the optimizer's, the GPU's, the buffers')."""
        opt = None
        if self.optimizer is not None:
            group = next((g for g in self.optimizer.param_groups if g.get("low_rank")), {})
            opt = {"name": self.settings.optimizer, "rank": group.get("rank"), "lr": self.settings.learning_rate,
                   "state_bytes": optimizer_state_bytes(self.optimizer)}
        return {"model": self.model_path, "optimizer": opt, "serving_requests": self.load.read(),
                "yielded_s": round(self.governor.yielded_s, 3) if self.governor is not None else 0.0,
                "tensor_parallel_size": self.tensor_parallel_size, "registry_size": len(self.registry),
                "replay_size": len(self.replay), "gpu_memory": self._gpu_memory()}

    def _gpu_memory(self) -> dict | None:
        """The worker's own GPU memory (above the shared weights, which vLLM allocated), and the estimate."""
        if self.model is None or not (device := next(self.model.parameters()).device).type == "cuda":
            return None
        return {"allocated_bytes": torch.cuda.memory_allocated(device),
                "peak_bytes": torch.cuda.max_memory_allocated(device),
                "estimate_bytes": memory.estimate(self.model, self.optimizer, self.settings)}

    def report(self, kind: str, full: bool = False, **fields) -> None:
        """An event for /metrics with the gauges now (`full`: the optimizer's state size too, which walks it)."""
        if self.metrics is None:
            return
        state = self.state.read()
        gauges = {"state": state["phase"], "queue": len(self.jobs), "loss": state["last_loss"],
                  "replay_size": len(self.replay), "eval_loss": state["eval_loss"],
                  "last_checkpoint_time": (state["last_checkpoint"] or {}).get("time")}
        if full and self.optimizer is not None:
            gauges["optimizer_state_bytes"] = optimizer_state_bytes(self.optimizer)
        self.metrics.send(kind, gauges=gauges, **fields)

    def report_job(self, job: Job) -> None:
        done = job.state == "done" and job.kind == "train"
        self.report("job", full=True, job=job.kind, state=job.state,
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
