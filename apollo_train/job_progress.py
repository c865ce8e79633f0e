"""Waiting on the server's jobs with a progress bar, by polling GET /train/status?job_id=.

A training job reports the steps it took, not how many it will take (the server packs examples into
steps by their token counts), so the bar is indeterminate until every job is done: it counts steps,
shows the last loss and, once a job has finished, the tokens per second the finished jobs trained at.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.filesize import decimal as size
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from apollo_train.client import Client, HTTPError
from apollo_train.shared.answers import FINISHED as SERVER_FINISHED

FINISHED = (*SERVER_FINISHED, "lost")  # "lost": the server no longer knows the job (this client's own state)
POLL_S = 0.5


def poll(client: Client, job_id: str) -> dict:
    """The job's state; a job the server no longer knows (its worker restarted) is `lost`."""
    try:
        return client.status(job_id)
    except HTTPError as exc:
        if exc.status != 404:
            raise
        return {"job_id": job_id, "state": "lost",
                "error": f"the server no longer knows this job ({exc.message}): its training worker restarted, "
                         f"see `apollo-train status`"}


def watch_training(client: Client, job_ids: list[str], console: Console) -> list[dict]:
    """Poll the training jobs until all are finished, with a bar; their final states, in order."""
    jobs: dict[str, dict] = {}
    columns = (SpinnerColumn(), TextColumn("training"), BarColumn(bar_width=24),
               TextColumn("steps {task.completed:.0f}  jobs {task.fields[done]}/{task.fields[jobs]}  "
                          "loss {task.fields[loss]}  tokens/s {task.fields[speed]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("training", total=None, done=0, jobs=len(job_ids), loss="-", speed="-")
        while True:
            for job_id in job_ids:
                if jobs.get(job_id, {}).get("state") not in FINISHED:
                    jobs[job_id] = poll(client, job_id)
                    if jobs[job_id]["state"] == "queued":
                        break  # the ones after it are queued too: the server runs jobs in order
            steps = sum(job.get("steps") or 0 for job in jobs.values())
            done = sum(job["state"] in FINISHED for job in jobs.values())
            progress.update(task, completed=steps, done=done, loss=format_loss(last_loss(jobs.values())),
                            speed=_speed(jobs.values()))
            if done == len(job_ids):
                progress.update(task, total=steps)
                return [jobs[job_id] for job_id in job_ids]
            time.sleep(POLL_S)


def wait_for(client: Client, job_id: str, console: Console) -> dict:
    """Poll a checkpoint or restore job until it is finished, with a spinner, its state (it may wait behind
    training jobs) and, for a checkpoint being written, its bytes."""
    columns = (SpinnerColumn(), TextColumn("{task.description} {task.fields[state]}"),
               TextColumn("{task.fields[written]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:  # the result line replaces it
        job = poll(client, job_id)
        task = progress.add_task(job.get("kind", "job"), total=None, state=job["state"], written="")
        while job["state"] not in FINISHED:
            writing = (client.status().get("checkpoint_in_progress") or {}) if job["state"] == "running" else {}
            written = format_written(writing) if writing.get("job_id") == job_id else ""
            progress.update(task, state=job["state"], written=written)
            time.sleep(POLL_S)
            job = poll(client, job_id)
    return job


def summary(jobs: list[dict]) -> str:
    """One line: how the jobs ended, their steps, tokens, speed and last loss."""
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job["state"]] = counts.get(job["state"], 0) + 1
    ended = ", ".join(f"{n} {state.replace('_', ' ')}" for state, n in counts.items())
    steps = sum(job.get("steps") or 0 for job in jobs)
    tokens, seconds = _trained(jobs)
    speed = f" in {seconds:.1f} s ({_speed(jobs)} tokens/s)" if seconds else ""
    skipped = sum(job.get("skipped_duplicates") or 0 for job in jobs)
    line = f"{len(jobs)} job{'s' * (len(jobs) != 1)}: {ended}; {steps} steps, {tokens:,} tokens{speed}"
    line += f", last loss {format_loss(last_loss(jobs))}"
    return line + (f"; {skipped} duplicate examples skipped (--force trains them again)" if skipped else "")


def last_loss(jobs) -> float | None:
    """The last finite loss of the latest job that has one."""
    for job in reversed(list(jobs)):
        finite = [x for x in job.get("losses") or () if x is not None]
        if finite:
            return finite[-1]
    return None


def format_written(writing: dict) -> str:
    """A checkpoint being written (status's `checkpoint_in_progress`): bytes so far, of how many once known."""
    done, total = writing.get("bytes_written") or 0, writing.get("bytes_total")
    return f"{size(done)} of {size(total)} ({done / total:.0%})" if total else f"{size(done)} written"


def format_loss(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.4g}"


def _trained(jobs) -> tuple[int, float]:
    """Tokens and seconds of the jobs that trained to the end (a job reports its tokens only then)."""
    ended = [job for job in jobs if job.get("tokens") and job.get("started") and job.get("finished")]
    return sum(job["tokens"] for job in ended), sum(job["finished"] - job["started"] for job in ended)


def _speed(jobs) -> str:
    tokens, seconds = _trained(jobs)
    return f"{tokens / seconds:,.0f}" if seconds else "-"
