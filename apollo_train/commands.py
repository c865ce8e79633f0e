"""`apollo-train post | status | checkpoint | checkpoints | restore | cancel`: an operator's client of a
running server (`apollo-train serve`), over the same HTTP routes any client uses (docs/api.md).

Results go to stdout, progress and diagnostics to stderr. A failed request prints the server's message
(it carries the fix) and exits 1; bad data or arguments exit 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.parse
from pathlib import Path

from rich.console import Console
from rich.filesize import decimal as size
from rich.table import Table

from apollo_train import job_progress, status_view
from apollo_train.chat_file import BATCH_EXAMPLES, DataError, batches, read_examples
from apollo_train.cli_errors import explain
from apollo_train.client import Client, HTTPError, Unreachable

DEFAULT_URL = "http://127.0.0.1:8000"
COMMANDS = ("post", "status", "checkpoint", "checkpoints", "restore", "cancel")
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 5.0  # backoff while the server's queue is full


def main(argv: list[str]) -> int:
    """`argv` starts with the command's name."""
    args = parser().parse_args(argv)
    # Plain text: the server's messages hold brackets (`examples[0].messages`) that are not markup.
    out = Console(markup=False, highlight=False, soft_wrap=True)
    err = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)
    client = Client(args.url, api_key=args.api_key)
    try:
        return args.run(client, args, out, err)
    except (HTTPError, Unreachable) as exc:
        err.print(f"apollo-train {args.command}: {explain(exc)}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        err.print("interrupted")
        return EXIT_INTERRUPTED


def parser() -> argparse.ArgumentParser:
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--url", type=_url, default=os.environ.get("APOLLO_TRAIN_URL", DEFAULT_URL),
                        help="the server (env APOLLO_TRAIN_URL; default %(default)s)")
    server.add_argument("--api-key", default=os.environ.get("APOLLO_TRAIN_API_KEY"),
                        help="the key the server was started with (env APOLLO_TRAIN_API_KEY)")
    p = argparse.ArgumentParser(prog="apollo-train", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run, help: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, parents=[server], help=help, description=help)
        cmd.set_defaults(run=run)
        return cmd

    post = command("post", post_command, "Train the served model on chat examples from a JSONL file "
                   "(one POST /train example per line, as `apollo-train train` reads).")
    post.add_argument("data", metavar="DATA.jsonl", type=Path)
    post.add_argument("--epochs", type=_at_least_one, default=1, help="passes over each request's examples (default 1)")
    post.add_argument("--lr", type=float, help="learning rate for these jobs (default: the server's)")
    post.add_argument("--strip", type=int, nargs="+", metavar="I",
                      help="message indices to strip (context distillation) from examples without their own strip")
    post.add_argument("--force", action="store_true", help="train examples the server trained before")
    post.add_argument("--batch-size", type=_at_least_one, default=BATCH_EXAMPLES,
                      help="examples per request, at most the server's --train-max-examples-per-request "
                           "(default %(default)s)")
    post.add_argument("--wait", action="store_true", help="show progress until every job is done; exit 1 if any "
                      "failed or was cancelled")

    status = command("status", status_command, "The server's training state.")
    status.add_argument("--follow", action="store_true", help="refresh every second, with the loss trend, "
                        "until Ctrl-C")

    checkpoint = command("checkpoint", checkpoint_command, "Write the served weights and the training state.")
    checkpoint.add_argument("name", metavar="NAME", nargs="?",
                            help="a directory under the server's checkpoint root (default: into the served "
                                 "model's own directory)")
    checkpoint.add_argument("--wait", action="store_true", help="wait until it is written")

    command("checkpoints", checkpoints_command, "List the checkpoints the server can restore.")

    restore = command("restore", restore_command, "Serve a checkpoint's weights and training state again, in "
                      "place (ids and names as `apollo-train checkpoints` lists them).")
    restore.add_argument("checkpoint", metavar="ID", help="a checkpoint's id or name, or 'served'")
    restore.add_argument("--wait", action="store_true", help="wait until it is restored")

    cancel = command("cancel", cancel_command, "Cancel a training job: a queued one at once, a running one "
                     "after its current step.")
    cancel.add_argument("job_id", metavar="JOB_ID")
    return p


def _url(value: str) -> str:
    if urllib.parse.urlsplit(value).scheme not in ("http", "https"):
        raise argparse.ArgumentTypeError(f"{value!r} is not an http(s) URL; e.g. http://127.0.0.1:8000")
    return value


def _at_least_one(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1")
    return number


def post_command(client: Client, args, out: Console, err: Console) -> int:
    try:
        examples = read_examples(args.data, args.strip)
    except DataError as exc:
        err.print(f"apollo-train post: {exc}; nothing was sent")
        return EXIT_USAGE
    requests = batches(examples, args.batch_size)
    if len(requests) > 1:
        err.print(f"{len(examples)} examples in {len(requests)} requests (one job each; --epochs applies to each)")
    options = {"epochs": args.epochs, "force": args.force, **({"lr": args.lr} if args.lr is not None else {})}
    job_ids: list[str] = []
    try:
        for batch in requests:
            job = _submit(client, batch, options, err)
            job_ids.append(job["job_id"])
            out.print(f"job {job['job_id']} {job['state']}: {job['accepted']} examples, "
                      f"{job['skipped_duplicates']} duplicates skipped")
        if not args.wait:
            return 0
        jobs = job_progress.watch_training(client, job_ids, err)
    except BaseException:
        if job_ids:
            err.print(f"the jobs posted keep training on the server (`apollo-train cancel JOB_ID` stops one): "
                      f"{' '.join(job_ids)}")
        raise
    for job in jobs:
        if job["state"] != "done":
            err.print(f"job {job['job_id']} {job['state']}: {job.get('error') or job.get('warning') or ''}")
    out.print(job_progress.summary(jobs))
    return 0 if all(job["state"] == "done" for job in jobs) else EXIT_FAILED


def _submit(client: Client, batch: list[dict], options: dict, err: Console) -> dict:
    """POST /train, retried with a backoff while the server is busy (429: its queue is full)."""
    delay = RETRY_FIRST_S
    while True:
        try:
            return client.train(batch, **options)
        except HTTPError as exc:
            if exc.status != 429:
                raise
            if delay == RETRY_FIRST_S:
                err.print(f"the server is busy ({exc.message}): retrying until it takes the request")
            time.sleep(delay)
            delay = min(2 * delay, RETRY_MAX_S)


def status_command(client: Client, args, out: Console, err: Console) -> int:
    if not args.follow:
        out.print(status_view.render(client.status()))
        return 0
    try:
        status_view.follow(client, out)
    except KeyboardInterrupt:  # how --follow ends
        return 0


def checkpoint_command(client: Client, args, out: Console, err: Console) -> int:
    job = client.checkpoint(args.name)
    out.print(f"checkpoint job {job['job_id']} {job['state']}: {job['path']}")
    return _finish(client, job, args.wait, out, err)


def restore_command(client: Client, args, out: Console, err: Console) -> int:
    job = client.restore(args.checkpoint)
    out.print(f"restore job {job['job_id']} {job['state']}: {job['path']}")
    return _finish(client, job, args.wait, out, err)


def _finish(client: Client, job: dict, wait: bool, out: Console, err: Console) -> int:
    """With --wait, follow a checkpoint or restore job to its end and say how it ended."""
    if not wait:
        return 0
    job = job_progress.wait_for(client, job["job_id"], err)
    seconds = f" in {job['finished'] - job['started']:.1f} s" if job.get("finished") and job.get("started") else ""
    written = f", {size(job['bytes'])}" if job.get("bytes") else ""
    detail = f": {job['error']}" if job.get("error") else ""
    out.print(f"{job['kind']} job {job['job_id']} {job['state']}{seconds}{written}{detail}")
    return 0 if job["state"] == "done" else EXIT_FAILED


def checkpoints_command(client: Client, args, out: Console, err: Console) -> int:
    checkpoints = client.checkpoints()
    if not checkpoints:
        out.print("no checkpoints yet: `apollo-train checkpoint NAME` writes one")
        return 0
    table = Table("id", "name", "step", "time", "size", box=None, header_style="bold")
    table.add_column("path", overflow="fold")
    for c in checkpoints:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["time"]))
        table.add_row(c["id"], c.get("name", ""), str(c["step"]), when, size(c["bytes"]), c["path"])
    out.print(table)
    return 0


def cancel_command(client: Client, args, out: Console, err: Console) -> int:
    job = client.cancel(args.job_id)
    if job["state"] == "cancelled":
        out.print(f"job {job['job_id']} cancelled")
    else:
        out.print(f"job {job['job_id']} {job['state']}: it stops after its current step")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
