"""Update visibility: from the end of a weight write until a served token reflects it.

A greedy streaming completion runs (logprobs on). At time t_end a "step" ends that sets the output
embedding (lm_head; the embedding when tied) to zero, which makes every next-token distribution
uniform, so the first streamed token whose logprob is -log(vocab) is the first one computed with the
new weights. Two ways of getting the step's weights into vLLM are timed, on the same server:

- in place (apollo-train): the training worker's parameters are vLLM's memory; the step's write *is*
  the update. Here the benchmark writes through the same CUDA IPC handles the worker uses.
- vLLM's own path: a trainer holding its own copy of all weights sends them as CUDA IPC handles; vLLM
  pauses generation (keeping requests), copies every tensor in with the model's `load_weights`,
  resumes, and resets its prefix cache. This is what `/pause` -> `/update_weights` (IPC backend) ->
  `/resume` does for an unquantized model; it runs through dev mode's `/collective_rpc` and the worker
  extension in vllm_weight_update.py, because vLLM 0.26's IPC engine imports Ray, which the GPU
  machine lacks. The server must run with VLLM_SERVER_DEV_MODE=1 and
  `--worker-extension-cls benchmarks.vllm_weight_update.WeightUpdateExtension`; else only the in-place
  path is measured.

Also timed: the worker's after-step hook (router resets vLLM's prefix cache), which HOGWILD training
sends after every step; it does not gate visibility for running requests.

    python benchmarks/visibility_bench.py --url URL --run-dir RUN_DIR [--trials 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Client,
    add_server_args,
    emit,
    fmt,
    open_weights,
    post,
    server_from_args,
    split_argv,
    sync,
    wait_idle,
)


class Stream:
    """A greedy streaming completion; records (arrival time, logprob) of every token."""

    def __init__(self, url: str, model: str, max_tokens: int, prompt: str):
        self.url, self.body = (
            url,
            {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "stream": True,
                "logprobs": 0,
                "ignore_eos": True,
                "temperature": 0.0,
            },
        )
        self.tokens: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.done = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.cond = threading.Condition()

    def _run(self) -> None:
        req = urllib.request.Request(
            self.url + "/v1/completions",
            data=json.dumps(self.body).encode(),
            method="POST",
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=600) as resp:
                for line in resp:
                    if self.stop.is_set():
                        break
                    if not line.startswith(b"data: "):
                        continue
                    payload = line[6:].strip()
                    if payload == b"[DONE]":
                        break
                    now = time.perf_counter()
                    choice = json.loads(payload)["choices"][0]
                    lps = (choice.get("logprobs") or {}).get("token_logprobs") or []
                    with self.cond:
                        self.tokens += [(now, lp) for lp in lps if lp is not None]
                        self.cond.notify_all()
        except Exception as exc:  # reported by the caller
            self.error = exc
        finally:
            self.done.set()
            with self.cond:
                self.cond.notify_all()

    def start(self) -> "Stream":
        self.thread.start()
        return self

    def wait_for(self, pred, timeout: float = 120):
        """First recorded token index >= start satisfying pred(logprob), waiting for it."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i, (t, lp) in enumerate(self.tokens):
                    if pred(i, t, lp):
                        return i, t, lp
                if self.done.is_set() or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"stream ended without the expected token ({len(self.tokens)} tokens, {self.error})"
                    )
                self.cond.wait(0.5)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)


def trial(url, model, weight, uniform_lp, update, max_tokens, k) -> dict:
    """Start a stream, run `update()` (it returns t_end and its own timings), find the first token
    with the uniform logprob, then restore the weights in place. Each trial's prompt starts
    differently, so no trial reuses cached keys/values computed by another one."""
    saved = weight.clone()
    stream = Stream(url, model, max_tokens, f"Story {k}: once upon a time, in a city by the river,").start()
    try:
        stream.wait_for(lambda i, t, lp: i >= 8)
        n_before = len(stream.tokens)
        gaps = [b[0] - a[0] for a, b in zip(stream.tokens[1:n_before], stream.tokens[2:n_before])]
        if any(abs(lp - uniform_lp) < 1e-3 for _, lp in stream.tokens[:n_before]):
            raise RuntimeError("tokens are uniform before the update; pick another signal")
        t_end, info = update()
        try:
            i, t_vis, _ = stream.wait_for(lambda i, t, lp: t > t_end and abs(lp - uniform_lp) < 1e-2)
        except RuntimeError as exc:
            after = [(round(t - t_end, 4), round(lp, 3)) for t, lp in stream.tokens if t > t_end]
            raise RuntimeError(
                f"{exc}; update {info}; {len(after)} tokens after it, first {after[:8]}, "
                f"last {after[-3:]}; looking for {uniform_lp:.3f}"
            ) from None
        stale = sum(1 for t, lp in stream.tokens if t_end < t < t_vis)
    finally:
        stream.close()
        weight.copy_(saved)
        sync(weight)
        _reset_prefix_cache(url)
    return {
        "visible_after_s": t_vis - t_end,
        "stale_tokens_after_end": stale,
        "token_interval_s": statistics.median(gaps) if gaps else None,
        **info,
    }


def _reset_prefix_cache(url: str) -> None:
    """Drop keys/values computed during the trial (dev mode only; trials use distinct prompts anyway)."""
    try:
        post(url, "/reset_prefix_cache")
    except Exception:
        pass


def main(argv=None) -> None:
    own, extra = split_argv(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_args(parser)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=4000,
        help="length limit of each probe stream (closed once measured; the server needs --max-model-len above it)",
    )
    parser.add_argument("--no-vllm-path", action="store_true", help="measure only the in-place path")
    args = parser.parse_args(own)
    env = {"VLLM_SERVER_DEV_MODE": "1"}
    if not args.no_vllm_path and args.model:
        extra = [*extra, "--worker-extension-cls", "benchmarks.vllm_weight_update.WeightUpdateExtension"]

    import torch

    from apollo_train.shared import protocol

    with server_from_args(args, extra, env=env) as server:
        client = Client(server.url)
        model = client.model()
        wait_idle(client)
        content, params, ckpt = open_weights(Path(server.run_dir))
        # the output embedding as loaded: lm_head, or the embedding when they are tied
        ckpt_name = next((n for n in ckpt if n.endswith("lm_head.weight")), None) or next(
            n for n in ckpt if n.endswith("embed_tokens.weight")
        )
        weight, wname = ckpt[ckpt_name], ckpt_name
        uniform_lp = -math.log(weight.shape[0])

        def in_place():
            t0 = time.perf_counter()
            weight.zero_()  # the last write of an optimizer step
            sync(weight)
            t_end = time.perf_counter()
            return t_end, {"write_s": t_end - t0}

        inplace = [
            trial(server.url, model, weight, uniform_lp, in_place, args.max_tokens, k) for k in range(args.trials)
        ]

        # the after-step hook: router -> engine.reset_prefix_cache()
        import zmq

        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(protocol.hooks_address(server.run_dir))
        hook = []
        for _ in range(20):
            msg = protocol.request(protocol.HOOK_WEIGHTS_CHANGED)
            t0 = time.perf_counter()
            sock.send(protocol.pack(msg))
            if not sock.poll(30_000):
                raise RuntimeError("router did not answer the hook")
            answer = protocol.unpack(sock.recv())
            hook.append(time.perf_counter() - t0)
            if not answer["ok"]:
                raise RuntimeError(f"hook failed: {answer}")
        sock.close()

        vllm_path, vllm_error = [], None
        if not args.no_vllm_path:
            from vllm_weight_update import encode

            def vllm_update():
                # the trainer's own copy of every checkpoint tensor, with the step applied
                new = {n: t.clone() for n, t in ckpt.items()}
                new[ckpt_name].zero_()
                sync(weight)
                t_end = time.perf_counter()
                payload = encode(new)
                t1 = time.perf_counter()
                post(server.url, "/pause", query="?mode=keep")
                t2 = time.perf_counter()
                rpc = post(server.url, "/collective_rpc", {"method": "bench_load_weights", "args": [payload]})
                t3 = time.perf_counter()
                post(server.url, "/resume")
                post(server.url, "/reset_prefix_cache")
                t4 = time.perf_counter()
                del new
                info = (rpc.get("results") or [{}])[0] or {}
                return t_end, {
                    "handles_s": t1 - t_end,
                    "pause_s": t2 - t1,
                    "rpc_s": t3 - t2,
                    "resume_reset_s": t4 - t3,
                    "update_total_s": t4 - t_end,
                    "worker_load_weights_s": info.get("load_weights_s"),
                    "tensors": info.get("tensors"),
                }

            try:
                vllm_path = [
                    trial(server.url, model, weight, uniform_lp, vllm_update, args.max_tokens, 100 + k)
                    for k in range(args.trials)
                ]
            except Exception as exc:  # e.g. server without dev mode or the extension
                vllm_error = f"{type(exc).__name__}: {exc}"
                print(f"# vLLM path not measured: {vllm_error}", flush=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

        def med(rows, key):
            vals = [r[key] for r in rows if r.get(key) is not None]
            return statistics.median(vals) if vals else None

        ip_ms = med(inplace, "visible_after_s") * 1e3
        vp_ms = med(vllm_path, "visible_after_s") * 1e3 if vllm_path else None
        result = {
            "weight": wname,
            "in_place": inplace,
            "vllm_path": vllm_path,
            "vllm_path_error": vllm_error,
            "hook_rtt_s": hook,
            "in_place_visible_ms_median": ip_ms,
            "in_place_write_ms_median": med(inplace, "write_s") * 1e3,
            "token_interval_ms_median": med(inplace, "token_interval_s") * 1e3,
            "hook_rtt_ms_median": statistics.median(hook) * 1e3,
            "vllm_path_visible_ms_median": vp_ms,
            "vllm_path_update_ms_median": med(vllm_path, "update_total_s") * 1e3 if vllm_path else None,
            "vllm_over_in_place": vp_ms / ip_ms if vp_ms else None,
        }
        rows = [
            f"| visibility, in place | step end -> first new token {fmt(ip_ms, 2)} ms (token interval "
            f"{fmt(result['token_interval_ms_median'], 2)} ms, write {fmt(result['in_place_write_ms_median'], 3)} ms, "
            f"prefix-cache hook {fmt(result['hook_rtt_ms_median'], 2)} ms) |",
            f"| visibility, vLLM pause/load_weights/resume | step end -> first new token {fmt(vp_ms, 1)} ms "
            f"(update call {fmt(result['vllm_path_update_ms_median'], 1)} ms) | "
            f"ratio {fmt(result['vllm_over_in_place'], 1)} |",
        ]
        emit(args, "visibility", result, rows)


if __name__ == "__main__":
    main()
