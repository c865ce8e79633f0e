"""Does online training teach a served model new facts, at AdamW quality, without wrecking what it knew?

On the small real model in models/small-lm (scripts/pretrain_small_lm.py), inject N invented facts
("The capital of Vrelland is Oskarth.") one at a time, as a user of POST /train would: one job per
fact, one chat example (question -> answer sentence), a few epochs, the optimizer's state carried
from job to job. The training code is the worker's own (encode_example, Trainer, make_optimizer)
on the model in its served dtype (bf16). Then measure:

- recall: greedy answers to two paraphrased questions per fact (never trained on); a hit when the
  answer contains the fact's object (the capital, the inventor, the year...). Also the trained
  question itself, and 30 facts of the pretraining world the model answered before (retention);
- forgetting: perplexity of held-out pretraining text (models/small-lm/heldout.txt), before/after;
- optimizer state bytes (all of it, and the part for the projected matrices), training wall time.

    python benchmarks/learning_quality.py sweep    # the lr sweep of APOLLO-Mini, APOLLO, AdamW
    python benchmarks/learning_quality.py seeds    # the best lr of each on two more sets of facts
    python benchmarks/learning_quality.py knobs    # APOLLO-Mini variants at its best lr
    python benchmarks/learning_quality.py online   # the same facts through `apollo-train serve`
    python benchmarks/learning_quality.py report   # markdown tables of all results so far

Results are appended to a JSON file (default $TMPDIR/apollo-train-learning-quality.json) keyed by
run name, so the commands can run one after another or be repeated. docs/learning-quality.md
holds the results. CPU is fine (AMX bf16): a run takes about a minute here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from pretrain_small_lm import fact_question, fact_statement, world, world_names  # noqa: E402

MODEL = REPO / "models" / "small-lm"
RESULTS = Path(tempfile.gettempdir()) / "apollo-train-learning-quality.json"
STUDY_RELATIONS = ("capital", "river", "founded", "born", "inventor")  # "language" is guessable from the name
TRAIN_Q, TEST_QS = 0, (1, 2)

DEFAULT_SEED = 7
SWEEP = {  # optimizer -> learning rates tried
    "apollo-mini": [1e-4, 2e-4, 3e-4, 5e-4, 1e-3],
    "apollo": [1e-4, 3e-4, 1e-3],
    "adamw": [3e-5, 1e-4, 2e-4, 3e-4, 1e-3],
    "adamw-fp32": [3e-5, 1e-4, 2e-4, 3e-4],
}


def adamw_fp32(model, lr: float, **kw):
    """AdamW with fp32 moments (Apollo's AdamW path for every parameter) and Apollo's eps. The results of
    "adamw" in docs/learning-quality.md were measured when the server's "adamw" was torch.optim.AdamW,
    whose moments are bf16 for a bf16 model (0.999 * v rounds back to v); it is now this with eps 1e-8."""
    from worker.optim import Apollo
    from worker.param_groups import param_groups_for

    groups = [{**g, "low_rank": False} for g in param_groups_for(model)]
    return Apollo(groups, lr=lr, **kw)


# --------------------------------------------------------------------------- facts


def study_facts(n: int, seed: int) -> list[dict]:
    """n new facts, the relations in turn, each about a different invented country, with no name (or
    part of one) that occurs in the pretraining world."""
    countries = world(seed=seed, n_countries=n, exclude=world_names(world()))
    by_country = [countries[i * 6:(i + 1) * 6] for i in range(n)]
    out = []
    for i, facts in enumerate(by_country):
        rel = STUDY_RELATIONS[i % len(STUDY_RELATIONS)]
        out.append(next(f for f in facts if f["relation"] == rel))
    return out


def old_facts(n: int = 30) -> list[dict]:
    """n facts of the pretraining world (the same relations), for retention."""
    per = -(-n // len(STUDY_RELATIONS))
    out = []
    for rel in STUDY_RELATIONS:
        facts = [f for f in world() if f["relation"] == rel]
        out += facts[::len(facts) // per][:per]
    return out[:n]


def example(fact: dict) -> dict:
    return {"messages": [{"role": "user", "content": fact_question(fact, TRAIN_Q)},
                         {"role": "assistant", "content": fact_statement(fact)}]}


def hit(answer: str, fact: dict) -> bool:
    return fact["object"].lower() in answer.lower()


# --------------------------------------------------------------------------- offline pieces


def load(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    return tok, model


def generate(model, tok, questions: list[str], max_new_tokens: int = 24, batch: int = 64) -> list[str]:
    """Greedy answers, batched with left padding."""
    import torch

    tok.padding_side = "left"
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
               for q in questions]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            enc = tok(prompts[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id)
            out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [o.strip() for o in out]


def heldout_windows(tok, model_dir: Path, n: int, length: int) -> list[list[int]]:
    ids = tok((model_dir / "heldout.txt").read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    return [ids[i * length:(i + 1) * length] for i in range(min(n, len(ids) // length))]


def perplexity(model, windows: list[list[int]], batch: int = 16) -> float:
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            x = torch.tensor(windows[i:i + batch])
            logits = model(input_ids=x, use_cache=False).logits
            total += F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += x[:, 1:].numel()
    return math.exp(total / count)


def state_bytes_split(opt) -> dict:
    """Optimizer state bytes: all, and the part for the first group (the projected/linear matrices)."""
    from worker.param_groups import optimizer_state_bytes

    total = optimizer_state_bytes(opt)
    matrices = {id(p) for p in opt.param_groups[0]["params"]}
    sub = type("S", (), {})()
    sub.state = {p: s for p, s in opt.state.items() if id(p) in matrices}
    return {"state_bytes": total, "matrix_state_bytes": optimizer_state_bytes(sub)}


def recall_block(model, tok, facts, olds) -> dict:
    questions = ([fact_question(f, q) for f in facts for q in TEST_QS] + [fact_question(f, TRAIN_Q) for f in facts]
                 + [fact_question(f, TRAIN_Q) for f in olds])
    answers = generate(model, tok, questions)
    n, k = len(facts), len(TEST_QS)
    para = answers[:n * k]
    trained = answers[n * k:n * k + n]
    old = answers[n * k + n:]
    para_hits = [hit(a, facts[i // k]) for i, a in enumerate(para)]
    return {
        "recall": sum(para_hits) / len(para_hits),
        "recall_any": sum(any(para_hits[i * k:(i + 1) * k]) for i in range(n)) / n,
        "trained_q_recall": sum(hit(a, f) for a, f in zip(trained, facts)) / n,
        "old_recall": sum(hit(a, f) for a, f in zip(old, olds)) / max(1, len(olds)),
        "answers": {"paraphrase": para, "trained": trained, "old": old},
    }


class Study:
    """The model loaded once; each run restores the pretrained weights and trains from there."""

    def __init__(self, args):
        import torch

        from apollo_train.shared.cpu import enable_amx

        enable_amx()
        torch.set_num_threads(args.threads)
        self.args = args
        self.tok, self.model = load(args.model)
        self.base = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.facts = study_facts(args.n_facts, args.seed)
        self.olds = old_facts()
        self.windows = heldout_windows(self.tok, args.model, args.ppl_windows, args.ppl_length)
        from apollo_train.shared.schema import Example
        from worker.examples import encode_example, eos_token_ids

        eos = eos_token_ids(args.model, self.tok)
        self.encoded = [encode_example(self.tok, Example.model_validate(example(f)), eos_token_ids=eos)
                        for f in self.facts]
        self.results = _read(args.results)
        self.base_key = f"base:seed={args.seed}"
        if self.base_key not in self.results or self.results[self.base_key].get("config") != self._base_config():
            t0 = time.perf_counter()
            r = recall_block(self.model, self.tok, self.facts, self.olds)
            r.update(ppl=perplexity(self.model, self.windows), eval_s=time.perf_counter() - t0,
                     config=self._base_config())
            self.results = {**_read(args.results), self.base_key: r}
            _write(args.results, self.results)
        base = self.results[self.base_key]
        self._warm_up()
        print(f"base: recall {base['recall']:.3f}, trained-q {base['trained_q_recall']:.3f}, "
              f"old {base['old_recall']:.3f}, ppl {base['ppl']:.2f}", flush=True)

    def _warm_up(self) -> None:
        """A forward and backward pass on every example, so that the CPU's kernels for each shape are
        built before any run is timed (the first run would otherwise pay for it)."""
        from worker.trainer import Trainer, collate

        t0 = time.perf_counter()
        trainer = Trainer(self.model, None, max_tokens_per_step=4096)
        for enc in self.encoded:
            trainer.loss(*collate([enc])).backward()
        self.model.zero_grad(set_to_none=True)
        print(f"warm-up {time.perf_counter() - t0:.0f} s", flush=True)

    def _base_config(self) -> dict:
        a = self.args
        return {"n_facts": a.n_facts, "seed": a.seed, "ppl_windows": a.ppl_windows, "ppl_length": a.ppl_length,
                "model": str(a.model)}

    def run(self, name: str, optimizer: str, lr: float, epochs: int, freeze_embeddings: bool = False, **kw) -> dict:
        import torch

        from worker.param_groups import make_optimizer
        from worker.trainer import Trainer

        if self.args.seed != DEFAULT_SEED:
            name += f":seed={self.args.seed}"
        if name in self.results and not self.args.force:
            print(f"{name}: cached", flush=True)
            return self.results[name]
        self.model.load_state_dict(self.base)
        for n, p in self.model.named_parameters():
            p.requires_grad_(not (freeze_embeddings and ("embed" in n or "lm_head" in n)))
        torch.manual_seed(0)
        opt = adamw_fp32(self.model, lr, **kw) if optimizer == "adamw-fp32" else make_optimizer(
            self.model, optimizer, lr, **kw)
        trainer = Trainer(self.model, opt, max_tokens_per_step=4096)
        losses, skipped = [], 0
        t0 = time.perf_counter()
        for enc in self.encoded:
            res = trainer.train([enc], epochs=epochs)
            losses.append((res.losses[0], res.losses[-1]))
            skipped += res.skipped_steps
        train_s = time.perf_counter() - t0
        r = recall_block(self.model, self.tok, self.facts, self.olds)
        r.update(ppl=perplexity(self.model, self.windows), **state_bytes_split(opt))
        for p in self.model.parameters():
            p.requires_grad_(True)
        r.update(seed=self.args.seed, name=name, optimizer=optimizer, lr=lr, epochs=epochs, options={**kw, **(
            {"freeze_embeddings": True} if freeze_embeddings else {})}, train_s=train_s,
            steps=len(self.encoded) * epochs, skipped_steps=skipped,
            first_loss=sum(a for a, _ in losses) / len(losses), last_loss=sum(b for _, b in losses) / len(losses),
            eval_s=time.perf_counter() - t0 - train_s)
        base = self.results[self.base_key]
        print(f"{name}: recall {r['recall']:.3f} (any {r['recall_any']:.3f}), "
              f"trained-q {r['trained_q_recall']:.3f}, old {r['old_recall']:.3f}, "
              f"ppl {base['ppl']:.2f} -> {r['ppl']:.2f}, state {r['state_bytes'] / 2**20:.2f} MiB"
              f" (matrices {r['matrix_state_bytes'] / 2**20:.3f}), loss {r['first_loss']:.2f} -> {r['last_loss']:.2f}, "
              f"train {train_s:.0f} s", flush=True)
        self.results = {**_read(self.args.results), name: r}  # another process may have added runs
        _write(self.args.results, self.results)
        opt.state.clear()
        return r


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)


def best_lr(results: dict, optimizer: str) -> float | None:
    """The swept lr with the best paraphrase recall; ties go to the smaller perplexity drift."""
    runs = [r for k, r in results.items() if k.startswith("sweep:") and r.get("optimizer") == optimizer
            and r.get("seed", DEFAULT_SEED) == DEFAULT_SEED]
    if not runs:
        return None
    return max(runs, key=lambda r: (r["recall"], r["trained_q_recall"], -r["ppl"]))["lr"]


def cmd_sweep(args) -> None:
    study = Study(args)
    for optimizer in args.optimizers:
        for lr in SWEEP[optimizer]:
            study.run(f"sweep:{optimizer}:lr={lr:g}", optimizer, lr, args.epochs)
    for optimizer in args.optimizers:
        print(f"best lr {optimizer}: {best_lr(study.results, optimizer)}")


def cmd_knobs(args) -> None:
    study = Study(args)
    lr = args.lr or best_lr(study.results, "apollo-mini")
    if lr is None:
        raise SystemExit("run `sweep` first (or pass --lr)")
    variants = {
        "limiter-off": dict(norm_growth_limit=None),
        "scale-512": dict(scale=512.0),
        "scale-32": dict(scale=32.0),
        "rank-8": dict(rank=8),
        "frozen-embeddings": dict(freeze_embeddings=True),
    }
    for name in args.variants or variants:
        study.run(f"knob:apollo-mini:{name}:lr={lr:g}", "apollo-mini", lr, args.epochs, **variants[name])
    if args.lr_knob:
        for lr2 in args.lr_knob:
            study.run(f"knob:apollo-mini:limiter-off:lr={lr2:g}", "apollo-mini", lr2, args.epochs,
                      norm_growth_limit=None)


# --------------------------------------------------------------------------- online


def cmd_online(args) -> None:
    """The same facts through `apollo-train serve`: POST /train one fact at a time (wait), then
    recall through /v1/chat/completions (temperature 0) and held-out perplexity through
    /v1/completions (echo + logprobs)."""
    from transformers import AutoTokenizer

    from apollo_train.launcher import ServerProcess, free_port

    results = _read(args.results)
    optimizer = args.optimizer
    lr = args.lr or best_lr(results, optimizer)
    if lr is None:
        raise SystemExit("run `sweep` first (or pass --lr)")
    facts, olds = study_facts(args.n_facts, args.seed), old_facts()
    tok = AutoTokenizer.from_pretrained(args.model)
    windows = heldout_windows(tok, args.model, args.ppl_windows, args.ppl_length)
    work = Path(tempfile.mkdtemp(prefix="apollo-lq-"))
    (work / "run").mkdir(parents=True)
    env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
           "APOLLO_TRAIN_RUN_DIR": str(work / "run"), "APOLLO_TRAIN_STATE_DIR": str(work / "state")}
    serve_args = ["--enforce-eager", "--dtype", "bfloat16", "--max-model-len", "1024",
                  "--train-optimizer", optimizer, "--train-lr", str(lr)]
    server = ServerProcess(args.model, serve_args, port=free_port(), log=work / "server.log", env=env)
    print(f"# apollo-train serve {args.model} {' '.join(serve_args)} (log {server.log})", flush=True)
    client = server.client
    try:
        server.start()
        ready_s = server.started_s
        model = client.model()

        def served_recall() -> dict:
            questions = ([fact_question(f, q) for f in facts for q in TEST_QS]
                         + [fact_question(f, TRAIN_Q) for f in facts] + [fact_question(f, TRAIN_Q) for f in olds])
            answers = [client.chat([{"role": "user", "content": q}], max_tokens=24).strip() for q in questions]
            n, k = len(facts), len(TEST_QS)
            para_hits = [hit(a, facts[i // k]) for i, a in enumerate(answers[:n * k])]
            return {"recall": sum(para_hits) / len(para_hits),
                    "recall_any": sum(any(para_hits[i * k:(i + 1) * k]) for i in range(n)) / n,
                    "trained_q_recall": sum(hit(a, f) for a, f in zip(answers[n * k:n * k + n], facts)) / n,
                    "old_recall": sum(hit(a, f) for a, f in zip(answers[n * k + n:], olds)) / len(olds),
                    "answers": {"paraphrase": answers[:n * k], "trained": answers[n * k:n * k + n],
                                "old": answers[n * k + n:]}}

        def served_ppl() -> float:
            total, count = 0.0, 0
            for w in windows:
                body = {"model": model, "prompt": w, "max_tokens": 1, "echo": True, "logprobs": 0, "temperature": 0}
                lps = client.request("POST", "/v1/completions", body)["choices"][0]["logprobs"]["token_logprobs"]
                vals = [v for v in lps[1:len(w)] if v is not None]
                total -= sum(vals)
                count += len(vals)
            return math.exp(total / count)

        before = served_recall()
        before["ppl"] = served_ppl()
        print(f"served before: recall {before['recall']:.3f}, ppl {before['ppl']:.2f}", flush=True)
        t0 = time.perf_counter()
        steps = 0
        for f in facts:
            job = client.train([example(f)], epochs=args.epochs, wait=True)
            if job.get("state") != "done":
                raise RuntimeError(f"train job failed: {job}")
            steps += job.get("steps", 0)
        train_s = time.perf_counter() - t0
        after = served_recall()
        after["ppl"] = served_ppl()
        status = client.status()
        r = {**after, "name": f"online:{optimizer}:lr={lr:g}", "optimizer": optimizer, "lr": lr, "epochs": args.epochs,
             "before": before, "train_s": train_s, "steps": steps, "ready_s": ready_s,
             "state_bytes": status["optimizer"].get("state_bytes"), "server_status": status}
        print(f"served after: recall {r['recall']:.3f} (any {r['recall_any']:.3f}), trained-q "
              f"{r['trained_q_recall']:.3f}, old {r['old_recall']:.3f}, ppl {before['ppl']:.2f} -> {r['ppl']:.2f}, "
              f"state {r['state_bytes']} B, train {train_s:.0f} s", flush=True)
        results = _read(args.results)
        results[r["name"]] = r
        _write(args.results, results)
    finally:
        server.stop()


# --------------------------------------------------------------------------- report


def _halves(r: dict, n: int) -> tuple[float, float]:
    """Paraphrase recall of the first and the second half of the facts (in training order)."""
    facts = study_facts(n, r.get("seed", DEFAULT_SEED))
    para, k = r["answers"]["paraphrase"], len(TEST_QS)
    hits = [hit(a, facts[i // k]) for i, a in enumerate(para)]
    half = n // 2 * k
    return sum(hits[:half]) / half, sum(hits[half:]) / (len(hits) - half)


def cmd_report(args) -> None:
    results = _read(args.results)
    base = results.get(f"base:seed={DEFAULT_SEED}")
    if not base:
        raise SystemExit("no results yet")
    mib = 2**20
    print(f"Before training (seed {DEFAULT_SEED}): paraphrase recall {base['recall']:.0%}, trained-question recall "
          f"{base['trained_q_recall']:.0%}, old-fact recall {base['old_recall']:.0%}, held-out ppl {base['ppl']:.2f}\n")
    print("| run | recall (paraphrases) | first / second half | trained question | old facts | held-out ppl | "
          "optimizer state | of which matrices | train time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if name.startswith("base"):
            continue
        b = results.get(f"base:seed={r.get('seed', DEFAULT_SEED)}", base)
        before = r["before"]["ppl"] if "before" in r else b["ppl"]
        first, second = _halves(r, args.n_facts)
        matrix = f"{r['matrix_state_bytes'] / mib:.3f} MiB" if "matrix_state_bytes" in r else "–"
        state = f"{r['state_bytes'] / mib:.2f} MiB" if r.get("state_bytes") is not None else "–"
        print(f"| {name} | {r['recall']:.0%} | {first:.0%} / {second:.0%} | {r['trained_q_recall']:.0%} | "
              f"{r['old_recall']:.0%} | {before:.2f} → {r['ppl']:.2f} | {state} | {matrix} | {r['train_s']:.0f} s |")
    print("\nBest lr per optimizer (seed 7), and the mean over every seed run at that lr:\n")
    print("| optimizer | lr | seeds | facts | recall (paraphrases) | trained question | ppl drift | optimizer state |")
    print("|---|---|---|---|---|---|---|---|")
    for optimizer in SWEEP:
        lr = best_lr(results, optimizer)
        if lr is None:
            continue
        runs = [r for k, r in results.items() if k.startswith("sweep:") and r.get("optimizer") == optimizer
                and r["lr"] == lr]
        drift = [r["ppl"] - results[f"base:seed={r.get('seed', DEFAULT_SEED)}"]["ppl"] for r in runs]
        mean = lambda key, runs=runs: sum(r[key] for r in runs) / len(runs)  # noqa: E731
        print(f"| {optimizer} | {lr:g} | {', '.join(str(r.get('seed', DEFAULT_SEED)) for r in runs)} | "
              f"{args.n_facts * len(runs)} | {mean('recall'):.1%} | {mean('trained_q_recall'):.1%} | "
              f"{sum(drift) / len(drift):+.2f} | {runs[0]['state_bytes'] / mib:.2f} MiB |")


def cmd_plot(args) -> None:
    """Recall against forgetting for every run of the seed-7 facts (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(args.results.read_text())
    base = results["base:seed=7"]["ppl"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for opt, color in zip(SWEEP, ("tab:blue", "tab:green", "tab:red", "tab:orange")):
        runs = sorted(
            (r for k, r in results.items() if k.startswith(f"sweep:{opt}:lr=") and "seed=" not in k),
            key=lambda r: r["lr"],
        )
        runs = [r for r in runs if r["ppl"] - base < 6]  # diverged runs leave the chart
        ax.plot([r["ppl"] - base for r in runs], [100 * r["recall"] for r in runs], "o-", color=color, label=opt)
        for r in runs:
            ax.annotate(f"{r['lr']:g}", (r["ppl"] - base, 100 * r["recall"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    frozen = results.get("knob:apollo-mini:frozen-embeddings:lr=0.0003")
    if frozen:
        ax.plot([frozen["ppl"] - base], [100 * frozen["recall"]], "*", ms=12, color="tab:purple",
                label="apollo-mini, embeddings frozen")
    ax.set_xlabel("held-out perplexity drift (after - before)")
    ax.set_ylabel("recall of 30 new facts on paraphrases (%)")
    ax.set_title("Teaching facts one job at a time (labels: learning rate)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


def cmd_seeds(args) -> None:
    """The best lr of each optimizer (from the seed-7 sweep) on other sets of facts."""
    results = _read(args.results)
    best = {o: best_lr(results, o) for o in args.optimizers}
    for seed in args.seeds:
        args.seed = seed
        study = Study(args)
        for optimizer, lr in best.items():
            if lr is not None:
                study.run(f"sweep:{optimizer}:lr={lr:g}", optimizer, lr, args.epochs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--n-facts", type=int, default=30)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the invented facts")
    p.add_argument("--epochs", type=int, default=5, help="epochs of each fact's training job")
    p.add_argument("--ppl-windows", type=int, default=64)
    p.add_argument("--ppl-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true", help="rerun runs that have results")
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("sweep")
    sp.add_argument("--optimizers", nargs="+", default=list(SWEEP), choices=list(SWEEP))
    sp.set_defaults(func=cmd_sweep)
    sp = sub.add_parser("knobs")
    sp.add_argument("--lr", type=float, default=None)
    sp.add_argument("--variants", nargs="*", default=None)
    sp.add_argument("--lr-knob", type=float, nargs="*", default=None, help="also: limiter off at these lrs")
    sp.set_defaults(func=cmd_knobs)
    sp = sub.add_parser("online")
    sp.add_argument("--optimizer", default="apollo-mini", choices=list(SWEEP))
    sp.add_argument("--lr", type=float, default=None)
    sp.set_defaults(func=cmd_online)
    sp = sub.add_parser("seeds")
    sp.add_argument("--seeds", type=int, nargs="+", default=[8, 9])
    sp.add_argument("--optimizers", nargs="+", default=list(SWEEP), choices=list(SWEEP))
    sp.set_defaults(func=cmd_seeds)
    sp = sub.add_parser("report")
    sp.set_defaults(func=cmd_report)
    sp = sub.add_parser("plot")
    sp.add_argument("--out", type=Path, default=Path("docs/learning-quality.png"))
    sp.set_defaults(func=cmd_plot)
    args = p.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
