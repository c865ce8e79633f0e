"""`apollo-train status`: the server's GET /train/status as a short table an operator reads at a glance,
an error or a warning above it; `--follow` redraws it every second with the loss trend."""

from __future__ import annotations

import time
from collections import deque

from rich.console import Console, Group
from rich.filesize import decimal as size
from rich.live import Live
from rich.table import Table
from rich.text import Text

from apollo_train.cli_errors import explain
from apollo_train.client import Client, HTTPError, Unreachable
from apollo_train.job_progress import format_loss, format_written

STATE_STYLES = {"idle": "green", "training": "bold cyan", "checkpointing": "cyan", "starting": "yellow",
                "error": "bold red"}
SPARK = "▁▂▃▄▅▆▇█"
TREND_LENGTH = 60  # losses the --follow trend keeps


def render(status: dict, losses: list[float] | None = None) -> Group:
    """The status as a table; `losses` (with --follow) adds their sparkline."""
    lines = [Text(f"error: {status['error']}", style="bold red")] if status.get("error") else []
    if status.get("warning"):
        lines.append(Text(f"warning: {status['warning']}", style="bold yellow"))
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    state = status.get("state", "?")
    table.add_row("state", Text(state, style=STATE_STYLES.get(state, "")))
    table.add_row("model", status.get("model") or "-")
    table.add_row("step", str(status.get("step", 0)))
    trained = f"{status.get('examples_trained', 0):,} examples, {status.get('tokens_trained', 0):,} tokens"
    table.add_row("trained", trained)
    table.add_row("last loss", format_loss(status.get("last_loss")))
    if losses:
        table.add_row("loss trend", f"{sparkline(losses)}  (last {len(losses)} refreshes that saw a new loss)")
    table.add_row("queue", _queue(status))
    table.add_row("optimizer", _optimizer(status.get("optimizer")))
    if "busy_share" in status:
        table.add_row("serving first", f"training takes {status['busy_share']:.0%} of the GPU while requests are in "
                                       f"flight ({status['serving_requests']} now); yielded "
                                       f"{status['yielded_s']:,.0f} s in all")
    table.add_row("last checkpoint", _checkpoint(status.get("last_checkpoint")))
    if status.get("checkpoint_in_progress"):
        table.add_row("writing", format_written(status["checkpoint_in_progress"]))
    table.add_row("worker", _worker(status.get("worker") or {}))
    return Group(*lines, table)


def follow(client: Client, console: Console, interval: float = 1.0) -> None:
    """Redraw the status every `interval` seconds until Ctrl-C; a server that stops answering is shown, not fatal."""
    losses: deque[float] = deque(maxlen=TREND_LENGTH)
    status = client.status()  # unreachable at first: the caller says so and exits
    last, problem = None, None
    with Live(console=console, auto_refresh=False) as live:
        while True:
            # The step counter moves when a job ends, the last loss at every step: either is news.
            if (status.get("step"), status.get("last_loss")) != last and status.get("last_loss") is not None:
                losses.append(status["last_loss"])
            last = status.get("step"), status.get("last_loss")
            view = render(status, list(losses))
            live.update(Group(Text(f"{problem}; retrying", style="bold red"), view) if problem else view, refresh=True)
            time.sleep(interval)
            try:
                status, problem = client.status(), None
            except (HTTPError, Unreachable) as exc:
                problem = explain(exc)


def sparkline(values: list[float]) -> str:
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARK[round((v - low) / span * (len(SPARK) - 1))] for v in values) + f"  {low:.3g} .. {high:.3g}"


def _queue(status: dict) -> str:
    waiting = status.get("queue", 0)
    text = f"{waiting} job{'s' * (waiting != 1)} waiting"
    if status.get("tokenizing"):
        text += f", {status['tokenizing']} requests tokenizing"
    return text


def _optimizer(opt: dict | None) -> str:
    if not opt:
        return "-"
    rank = f" rank {opt['rank']}" if opt.get("rank") else ""
    return f"{opt['name']}{rank}, lr {opt['lr']:g}, state {size(opt.get('state_bytes') or 0)}"


def _checkpoint(ckpt: dict | None) -> str:
    if not ckpt:
        return "none yet"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ckpt["time"]))
    return f"{ckpt['path']} (step {ckpt['step']}, {when}, {size(ckpt.get('bytes') or 0)})"


def _worker(worker: dict) -> Text:
    pids = worker.get("rank_pids")  # tensor parallelism: one training process per vLLM rank
    who = f"{len(pids)} ranks, pids {', '.join(map(str, pids))}" if pids else f"pid {worker.get('pid', '-')}"
    text = Text(f"{who}, {worker.get('restarts', 0)} restarts")
    if worker.get("last_exit") is not None:
        text.append(f", last exit: {worker['last_exit']}", style="yellow")
    if worker.get("gave_up"):
        text.append(f", gave up: {worker['gave_up']}", style="bold red")
    return text
