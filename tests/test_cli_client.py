"""The client commands (`apollo-train post | status | checkpoint | checkpoints | restore | cancel`): their
pieces on their own, then each command through `main(argv)` against the shared demo server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
from conftest import API_KEY, until
from rich.console import Console
from transformers import AutoTokenizer

from apollo_train import status_view
from apollo_train.chat_file import DataError, batches, read_examples
from apollo_train.cli import main
from apollo_train.cli_errors import KEY_HINT, explain
from apollo_train.client import HTTPError, Unreachable
from apollo_train.commands import post_command
from apollo_train.job_progress import summary
from apollo_train.launcher import free_port

QA = [("Which dock does the Gleb ferry leave from?", "The Gleb ferry leaves from dock seven at dawn."),
      ("Who keeps the lighthouse at Vella?", "Marta Quill has kept the lighthouse at Vella since 1988."),
      ("What colour is the Zorbian flag?", "The Zorbian flag is teal with a copper star."),
      ("How many bells hang in Plonk tower?", "Eleven bells hang in Plonk tower.")]


def chat(question: str, answer: str, system: str | None = None) -> dict:
    context = [{"role": "system", "content": system}] if system else []
    return {"messages": [*context, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture(autouse=True)
def wide_output(monkeypatch):
    """Tables one line per row (rich sizes output that is not a terminal by COLUMNS), no settings from the
    environment."""
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("APOLLO_TRAIN_URL", raising=False)
    monkeypatch.delenv("APOLLO_TRAIN_API_KEY", raising=False)


def unreachable_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


# ---------------------------------------------------------------------------------------------- unit


def test_examples_are_read_with_the_servers_schema_and_strip_applies_to_those_without_their_own(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a", system="Be brief."), "",
                                              dict(chat("q2", "a2", system="Be brief."), strip=[])])
    examples = read_examples(data, default_strip=[0])
    assert [e["strip"] for e in examples] == [[0], []]  # the blank line is skipped
    with pytest.raises(DataError, match=r"d.jsonl line 3: strip index 1 is out of range.*--strip applies"):
        read_examples(write_jsonl(data, [chat("q", "a", system="s"), chat("q", "a", system="s"),
                                         chat("q", "a")]), default_strip=[1])


@pytest.mark.parametrize("bad, needle", [
    ('{"messages": [{"role": "user", "content": "hi"}]}', "last message must be from the assistant"),
    ('{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
    ('{"messages": [], "id": 3}', "unknown key 'id'"),
])
def test_the_first_bad_line_is_named(tmp_path, bad, needle):
    data = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a"), bad, "not json either"])
    with pytest.raises(DataError, match=f"d.jsonl line 2: .*{needle}"):
        read_examples(data)
    with pytest.raises(DataError, match="no examples"):
        read_examples(write_jsonl(tmp_path / "empty.jsonl", ["", " "]))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"messages": "\xe9"}\n')
    with pytest.raises(DataError, match="latin1.jsonl line 1: not UTF-8 text"):
        read_examples(tmp_path / "latin1.jsonl")


def test_batches_stay_within_the_count_and_the_bytes():
    examples = [chat(f"q{i}", "a" * 100) for i in range(10)]
    assert [len(b) for b in batches(examples, max_examples=4)] == [4, 4, 2]
    one = len(json.dumps(examples[0]).encode()) + 2
    assert [len(b) for b in batches(examples, max_examples=100, max_bytes=3 * one)] == [3, 3, 3, 1]
    huge = chat("q", "a" * 10_000)
    assert [len(b) for b in batches([examples[0], huge, examples[1]], max_bytes=1000)] == [1, 1, 1]


def test_errors_say_the_fix():
    assert explain(Unreachable("http://h:1", ConnectionRefusedError())) == \
        "cannot reach http://h:1: is `apollo-train serve` running?"
    denied = HTTPError(401, {"error": {"message": "missing or wrong API key"}}, "GET /train/status")
    assert explain(denied) == f"missing or wrong API key\n  {KEY_HINT}"
    assert "older apollo-train" in explain(HTTPError(404, {"detail": "Not Found"}, "GET /checkpoints"))
    unknown = HTTPError(404, {"error": {"message": "unknown job id 'x'"}}, "POST /train/cancel")
    assert explain(unknown) == "unknown job id 'x'"


def test_unreachable_server_and_bad_arguments(capsys):
    url = unreachable_url()
    assert main(["status", "--url", url]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"apollo-train status: cannot reach {url}: is `apollo-train serve` running?"
    for argv in (["status", "--url", "localhost:8000"], ["post"], ["post", "x.jsonl", "--epochs", "0"],
                 ["cancel"], ["restore"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert "usage: apollo-train" in capsys.readouterr().err


def test_a_bad_line_exits_before_anything_is_sent(tmp_path, capsys):
    """The URL answers nothing: a request would end in `cannot reach` and exit 1, not in exit 2."""
    data = write_jsonl(tmp_path / "chats.jsonl", [chat(*QA[0]), chat(*QA[1]), '{"messages": "hi"}'])
    assert main(["post", str(data), "--url", unreachable_url()]) == 2
    err = capsys.readouterr().err
    assert "chats.jsonl line 3: messages: " in err and "nothing was sent" in err and "cannot reach" not in err


class FakeClient:
    """Answers POST /train and GET /train/status?job_id= from a script of job states."""

    def __init__(self, final_states: list[str]):
        self.final = final_states
        self.polls: dict[str, int] = {}

    def train(self, examples, **options) -> dict:
        job_id = f"job{len(self.polls)}"
        self.polls[job_id] = 0
        return {"job_id": job_id, "accepted": len(examples), "skipped_duplicates": 0, "state": "queued"}

    def status(self, job_id: str) -> dict:
        self.polls[job_id] += 1
        n = int(job_id[3:])
        if self.polls[job_id] < 2:
            return {"job_id": job_id, "state": "running", "steps": 1, "losses": [2.0]}
        return {"job_id": job_id, "state": self.final[n], "steps": 3, "losses": [2.0, 1.5, 1.0], "tokens": 300,
                "started": 10.0, "finished": 11.0, "error": "cancelled by request" if n else None}


def test_post_wait_exits_non_zero_when_a_job_did_not_finish_well(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [chat(*qa) for qa in QA[:2]])
    args = Namespace(data=data, strip=None, epochs=1, lr=None, force=False, batch_size=1, wait=True)
    console = Console(markup=False)
    assert post_command(FakeClient(["done", "done"]), args, console, console) == 0
    assert "2 jobs: 2 done; 6 steps, 600 tokens in 2.0 s (300 tokens/s), last loss 1" in capsys.readouterr().out
    assert post_command(FakeClient(["done", "cancelled"]), args, console, console) == 1
    out = capsys.readouterr().out
    assert "job job1 cancelled: cancelled by request" in out and "1 done, 1 cancelled" in out


def test_summary_and_sparkline():
    jobs = [{"job_id": "a", "state": "done", "steps": 0, "losses": [], "skipped_duplicates": 2},
            {"job_id": "b", "state": "failed", "steps": 2, "losses": [1.0, None]}]
    assert summary(jobs) == ("2 jobs: 1 done, 1 failed; 2 steps, 0 tokens, last loss 1; "
                             "2 duplicate examples skipped (--force trains them again)")
    assert status_view.sparkline([3.0, 2.0, 1.0, 1.0]).startswith("█▅▁▁")


# ---------------------------------------------------------------------------------------------- e2e


def run(capsys, server, *argv: str, key: str = API_KEY) -> tuple[int, str, str]:
    code = main([*argv, "--url", server.url, "--api-key", key])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def job_ids(out: str) -> list[str]:
    return [line.split()[1] for line in out.splitlines() if line.startswith("job ")]


def wait_finished(client, job_id: str, timeout: float = 300) -> dict:
    return until(lambda: (job := client.status(job_id))["state"] not in ("queued", "running") and job, timeout,
                 f"job {job_id} to finish")


def require_route(server, method: str, path: str) -> None:
    routes = server.client.request("GET", "/openapi.json")["paths"]
    if method.lower() not in routes.get(path, {}):
        pytest.skip(f"this server has no {method} {path} yet (404/405); the command is written against docs/api.md")


def test_post_wait_trains_in_batches_through_a_full_queue(server, tmp_path, capsys):
    c = server.client
    tok = AutoTokenizer.from_pretrained(server.model)
    prompts = [tok.apply_chat_template(chat(q, a)["messages"][:1], tokenize=False, add_generation_prompt=True)
               for q, a in QA]
    before = [c.answer_logprob(p, a) for p, (_, a) in zip(prompts, QA)]
    holder = c.train([chat("Hold the worker.", "The worker is busy for a while.")], epochs=60, force=True)
    data = write_jsonl(tmp_path / "chats.jsonl", [chat(q, a) for q, a in QA])
    # One example per request: 4 jobs behind the holder, and the queue holds 2.
    code, out, err = run(capsys, server, "post", str(data), "--epochs", "8", "--batch-size", "1", "--wait")
    assert code == 0, err
    assert len(job_ids(out)) == 4 and "4 examples in 4 requests" in err
    assert "the server is busy (the training queue is full" in err and "retrying" in err
    assert "4 jobs: 4 done; 32 steps" in out and "last loss" in out
    after = [c.answer_logprob(p, a) for p, (_, a) in zip(prompts, QA)]
    assert all(a > b + 1.0 for a, b in zip(after, before)), (before, after)
    assert c.status(holder["job_id"])["state"] == "done"


def test_status_prints_the_table_and_follows_until_ctrl_c(server, capsys, monkeypatch):
    code, out, _ = run(capsys, server, "status")
    assert code == 0
    for row in ("state", "model", "step", "trained", "last loss", "queue", "optimizer", "last checkpoint", "worker"):
        assert f"\n{row} " in f"\n{out}", row
    assert "apollo rank 64" in out and "0 restarts" in out and str(server.model) in out

    refreshes = []

    def sleep(seconds):  # the third refresh is interrupted as Ctrl-C would
        refreshes.append(seconds)
        if len(refreshes) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(status_view.time, "sleep", sleep)
    code, out, _ = run(capsys, server, "status", "--follow")
    assert code == 0 and refreshes == [1.0] * 3 and "state" in out


def test_checkpoint_list_and_restore(server, capsys):
    code, out, _ = run(capsys, server, "checkpoint", "cli-run", "--wait")
    assert code == 0 and "checkpoint job" in out and " done in " in out
    root = Path(server.client.status()["checkpoint_root"])
    assert (root / "cli-run" / "config.json").is_file()
    assert run(capsys, server, "checkpoint", "../outside")[0] == 1

    require_route(server, "GET", "/checkpoints")
    code, out, _ = run(capsys, server, "checkpoints")
    assert code == 0 and "cli-run" in out and str(root / "cli-run") in out

    require_route(server, "POST", "/checkpoint/restore")
    code, out, _ = run(capsys, server, "restore", "cli-run", "--wait")
    assert code == 0 and "restore job" in out and " done" in out
    code, _, err = run(capsys, server, "restore", "no-such-checkpoint")
    assert code == 1 and "GET /checkpoints" in err


def test_cancel_a_queued_and_a_running_job(server, tmp_path, capsys):
    c = server.client
    long = write_jsonl(tmp_path / "long.jsonl", [chat("Keep the worker busy.", "Busy, busy, busy.")])
    short = write_jsonl(tmp_path / "short.jsonl", [chat("Is this queued?", "It is queued.")])
    running = job_ids(run(capsys, server, "post", str(long), "--epochs", "300", "--force")[1])[0]
    while c.status(running)["state"] == "queued":
        time.sleep(0.05)
    queued = job_ids(run(capsys, server, "post", str(short), "--force")[1])[0]
    code, out, _ = run(capsys, server, "cancel", queued)
    assert code == 0 and out.strip() == f"job {queued} cancelled"
    code, out, _ = run(capsys, server, "cancel", running)
    assert code == 0 and "stops after its current step" in out
    assert wait_finished(c, running)["state"] == "cancelled"
    code, _, err = run(capsys, server, "cancel", queued)
    assert code == 1 and "finished" in err


def test_a_wrong_key_prints_the_message_and_the_hint_without_a_traceback(server):
    result = subprocess.run([sys.executable, "-m", "apollo_train.cli", "status", "--url", server.url],
                            env={**os.environ, "APOLLO_TRAIN_API_KEY": "wrong"}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("apollo-train status: missing or wrong API key") and KEY_HINT in result.stderr
    assert "Traceback" not in result.stderr
