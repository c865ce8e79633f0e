"""Shared pieces of the serving benchmarks: a server to measure, load generators, results.

Every benchmark either starts its own `apollo-train serve` (give `--model` and, after `--`, extra
flags for it) or measures one that is already running (`--url` and `--run-dir`), so that one server
can serve several benchmarks in a row (scripts/gpu_run.sh does that on the GPU). Results go to a
JSON file and a markdown row printed on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from apollo_train.client import Client  # noqa: E402
from apollo_train.launcher import ServerProcess  # noqa: E402

PROMPT = "Request {i}: the quick brown fox jumps over the lazy dog. Hello world! Tell me a long story."
WORDS = (
    "the quick brown fox jumps over lazy dog model learns from text one token at a time server keeps "
    "cache keys values weights change optimizer state memory small city river market station bridge "
    "question answer system helpful brief honest seven days week twelve capital France Germany Japan"
).split()


# --------------------------------------------------------------------------- servers


class Server(ServerProcess):
    """`apollo-train serve MODEL ARGS...` with a run dir the benchmarks can open handles in."""

    def __init__(
        self,
        model: str,
        serve_args=(),
        *,
        port: int = 8000,
        log: Path | None = None,
        run_dir: Path | None = None,
        env: dict | None = None,
        timeout: float = 900,
    ):
        self.run_dir = Path(run_dir) if run_dir else Path(f"/tmp/apollo-train-bench-run-{port}-{os.getpid()}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        env = {
            "APOLLO_TRAIN_RUN_DIR": str(self.run_dir),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": pythonpath,
            **(env or {}),
        }
        log = Path(log) if log else Path(f"/tmp/apollo-train-bench-{port}.log")
        super().__init__(model, serve_args, port=port, log=log, env=env, timeout=timeout)

    def start(self) -> "Server":
        print(f"# starting: apollo-train serve {self.model} {' '.join(self.serve_args)} (log {self.log})", flush=True)
        super().start()
        print(f"# ready after {self.started_s:.0f} s: {self.client.status().get('state')}", flush=True)
        return self


class Running:
    """A server someone else started."""

    def __init__(self, url: str, run_dir: str | None):
        self.url, self.run_dir, self.started_s = url, Path(run_dir) if run_dir else None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def add_server_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server (either --url or --model)")
    g.add_argument("--url", help="measure this running server")
    g.add_argument("--run-dir", help="its APOLLO_TRAIN_RUN_DIR (for benchmarks that open the weight handles)")
    g.add_argument("--model", help="start `apollo-train serve MODEL` (flags after `--` go to it)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--server-log", type=Path)
    parser.add_argument("--json", type=Path, help="write the result here (default: stdout only)")
    parser.add_argument("--label", default="", help="a name for this configuration in the table")


def server_from_args(args, extra: list[str], env: dict | None = None):
    if args.url:
        return Running(args.url, args.run_dir)
    if not args.model:
        raise SystemExit("give --url (a running server) or --model (start one)")
    return Server(
        args.model,
        extra,
        port=args.port,
        log=args.server_log,
        run_dir=Path(args.run_dir) if args.run_dir else None,
        env=env,
    )


def split_argv(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


# --------------------------------------------------------------------------- requests


def post(url: str, path: str, body: dict | None = None, timeout: float = 600, query: str = "") -> dict:
    data = json.dumps(body or {}).encode()
    req = urllib.request.Request(
        url + path + query, data=data, method="POST", headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw else {}


def completion(url: str, model: str, i: int, max_tokens: int) -> dict:
    """One non-streaming completion that generates exactly max_tokens tokens; returns timings."""
    t0 = time.perf_counter()
    out = post(
        url,
        "/v1/completions",
        {
            "model": model,
            "prompt": PROMPT.format(i=i),
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
        },
    )
    t1 = time.perf_counter()
    return {"start": t0, "end": t1, "latency": t1 - t0, "tokens": out["usage"]["completion_tokens"]}


def throughput_round(url: str, model: str, concurrency: int, max_tokens: int, offset: int = 0) -> dict:
    """`concurrency` requests at once; output tokens per second of wall time."""
    with ThreadPoolExecutor(concurrency) as pool:
        t0 = time.perf_counter()
        res = list(pool.map(lambda i: completion(url, model, offset + i, max_tokens), range(concurrency)))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in res)
    return {
        "wall_s": wall,
        "tokens": tokens,
        "tok_s": tokens / wall,
        "mean_latency_s": statistics.mean(r["latency"] for r in res),
    }


def streamed_completion(url: str, model: str, i: int, max_tokens: int, on_tokens=None) -> dict:
    """One streamed completion of exactly max_tokens tokens; `on_tokens(n)` is called as each chunk of n
    new tokens arrives (vLLM's running usage count), so throughput can be counted per time window."""
    body = {"model": model, "prompt": PROMPT.format(i=i), "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    t0, tokens = time.perf_counter(), 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.strip()
            if not line.startswith(b"data: {"):
                continue
            usage = json.loads(line[6:]).get("usage") or {}
            done = usage.get("completion_tokens", tokens)
            if done > tokens and on_tokens is not None:
                on_tokens(done - tokens)
            tokens = max(tokens, done)
    t1 = time.perf_counter()
    return {"start": t0, "end": t1, "latency": t1 - t0, "tokens": tokens}


class ClosedLoop:
    """`concurrency` clients, each sending the next streamed request when its last one finished. Tokens are
    counted as they stream in (`tokens_between`), so a window's throughput is not quantized by whole
    requests; the clients' first requests have staggered lengths, so that their requests do not start and
    end together in waves. `paused` holds the clients (between requests) without stopping them."""

    def __init__(self, url: str, model: str, concurrency: int, max_tokens: int):
        self.url, self.model, self.concurrency, self.max_tokens = url, model, concurrency, max_tokens
        self.results: list[dict] = []
        self.arrivals: list[tuple[float, int]] = []  # (time, new tokens)
        self.errors = 0
        self.paused = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _client(self, k: int) -> None:
        i = 0
        while not self._stop.is_set():
            if self.paused.is_set():
                time.sleep(0.05)
                continue
            length = self.max_tokens if i else 1 + k * self.max_tokens // self.concurrency
            try:
                r = streamed_completion(self.url, self.model, k * 100000 + i, length,
                                        lambda n: self.arrivals.append((time.perf_counter(), n)))
                if i:
                    with self._lock:
                        self.results.append(r)
            except Exception:
                self.errors += 1
                time.sleep(0.1)
            i += 1

    def tokens_between(self, t0: float, t1: float) -> int:
        return sum(n for t, n in list(self.arrivals) if t0 <= t < t1)

    def __enter__(self):
        self._threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(self.concurrency)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.results)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


# --------------------------------------------------------------------------- training load


def chat_examples(n: int, seed: int = 0, answer_words: int = 60, prompt_words: int = 40) -> list[dict]:
    """Synthetic chat examples of a few hundred tokens each."""
    import random

    rng = random.Random(seed)
    out = []
    for k in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(prompt_words))
        a = " ".join(rng.choice(WORDS) for _ in range(answer_words))
        out.append({"messages": [{"role": "user", "content": f"{k}: {q}?"}, {"role": "assistant", "content": a}]})
    return out


class ContinuousTraining:
    """Keeps the worker training: submits jobs (force=True) so that one is always queued. `examples` is one
    job's examples, or a list of them taken in turn. Jobs that fail are collected in `failed` (with the
    server's reason), not raised: a benchmark reports them."""

    def __init__(self, client: Client, examples: list, epochs: int = 2):
        self.client, self.epochs = client, epochs
        self.sets = examples if examples and isinstance(examples[0], list) else [examples]
        self._stop = threading.Event()
        self.jobs: list[str] = []
        self.failed: dict[str, str] = {}  # job id -> error
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                st = self.client.status()
                if st.get("queue", 0) < 1:
                    examples = self.sets[len(self.jobs) % len(self.sets)]
                    self.jobs.append(self.client.train(examples, epochs=self.epochs, force=True)["job_id"])
            except Exception as exc:  # a restarting worker, say: reported, and retried
                self.failed[f"request {time.strftime('%H:%M:%S')}"] = str(exc)
                time.sleep(1.0)
            time.sleep(0.1)

    def steps_done(self) -> int:
        """Optimizer steps of this object's jobs so far (a job counts its steps as they happen)."""
        steps = 0
        for j in list(self.jobs):
            try:
                job = self.client.status(j)
            except Exception as exc:
                self.failed[j] = str(exc)
                continue
            if job.get("state") in ("failed", "rolled_back"):
                self.failed[j] = job.get("error") or job["state"]
            steps += job.get("steps", 0)
        return steps

    def __enter__(self):
        self.thread.start()
        # the measurement starts with training under way
        deadline = time.monotonic() + 300
        while self.steps_done() == 0 and time.monotonic() < deadline and not self.failed:
            time.sleep(0.05)
        self.step_start, self.t_start = self.steps_done(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.steps = self.steps_done() - self.step_start
        self.seconds = time.perf_counter() - self.t_start
        self._stop.set()
        self.thread.join(30)
        for j in self.jobs:  # the running one stops after its step: the next measurement starts sooner
            try:
                self.client.cancel(j)
            except Exception:
                pass  # finished already
        wait_idle(self.client)


def wait_idle(client: Client, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = client.status()
        if st.get("state") == "idle" and st.get("queue", 0) == 0:
            return
        time.sleep(0.1)
    raise TimeoutError("training worker did not become idle")


# --------------------------------------------------------------------------- processes and memory


def children(pid: int) -> list[int]:
    """All descendants of pid (from /proc)."""
    parent_of = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent_of[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent_of.items() if pp == p]
        out += kids
        todo += kids
    return out


def gpu_memory_by_pid() -> dict[int, int]:
    """Bytes of GPU memory per process (nvidia-smi); {} without nvidia-smi."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    mem = {}
    for line in out.strip().splitlines():
        try:
            pid, mib = (s.strip() for s in line.split(","))
            mem[int(pid)] = int(mib) * 2**20
        except ValueError:
            pass
    return mem


def gpus_memory_used() -> list[int] | None:
    """Bytes in use on each GPU, all processes (nvidia-smi); None without nvidia-smi."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        return [int(mib) * 2**20 for mib in out.split()] or None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return "?"


# --------------------------------------------------------------------------- weights


def open_weights(run_dir: Path):
    """vLLM's parameters (name -> tensor sharing vLLM's memory) and the checkpoint tensors as
    views into them (checkpoint name -> view), from the handles file; no parity check, so this
    works after training changed the weights."""
    from apollo_train.shared import handles

    content = handles.read(handles.handles_path(run_dir, 0))
    if content["__metadata__"]["error"]:
        raise RuntimeError(content["__metadata__"]["error"])
    params = {n: handles.open_shared(e) for n, e in content["params"].items()}
    ckpt = {}
    for name, e in content["checkpoint"].items():
        numel = math.prod(e["shape"])
        ckpt[name] = params[e["param"]].view(-1)[e["offset"] : e["offset"] + numel].view(e["shape"])
    return content, params, ckpt


def sync(t) -> None:
    if getattr(t, "is_cuda", False):
        import torch

        torch.cuda.synchronize(t.device)


# --------------------------------------------------------------------------- output


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:
        pass
    import platform

    return f"CPU {platform.machine()} ({os.cpu_count()} cores)"


def emit(args, name: str, result: dict, rows: list[str]) -> None:
    result = {"benchmark": name, "label": args.label, "device": device_name(), "time": time.time(), **result}
    for r in rows:
        print(r, flush=True)
    text = json.dumps(result, indent=1, default=str)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    else:
        print(text)


def fmt(x, nd=1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:,.{nd}f}"
