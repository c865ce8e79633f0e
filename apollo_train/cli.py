"""`apollo-train`: serve a model with in-place training, train offline, or run the demo."""

from __future__ import annotations

import argparse
import os
import sys

from apollo_train.shared.config import PLUGIN_NAMES, Settings

# `apollo-train serve` flags -> the environment variables both processes read (config.Settings).
SERVE_FLAGS = {
    "--train-optimizer": "optimizer",
    "--train-lr": "lr",
    "--train-max-tokens-per-step": "max_tokens_per_step",
    "--train-queue-size": "queue_size",
    "--train-state-dir": "state_dir",
}


def serve_command(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The vLLM server command line and environment for `apollo-train serve [MODEL] [flags]`."""
    parser = argparse.ArgumentParser(
        prog="apollo-train serve",
        usage="apollo-train serve [MODEL] [--train-* flags] [vLLM flags]",
        description="Start vLLM's OpenAI server with /train, /train/status and /checkpoint. "
        "Flags not listed here go to vLLM. With no MODEL, a tiny built-in demo model is served.",
    )
    for flag in SERVE_FLAGS:
        parser.add_argument(flag)
    parser.add_argument("--train-barrier", action="store_true", help="pause generation around each optimizer step")
    parser.add_argument(
        "--train-freeze-embeddings", action="store_true", help="train neither the embeddings nor the output head"
    )
    if argv and argv[0] in ("-h", "--help"):
        parser.print_help()
        raise SystemExit(0)
    # MODEL comes first if given; argparse would take a vLLM flag's value for it.
    model = argv[0] if argv and not argv[0].startswith("-") else None
    args, vllm_args = parser.parse_known_args(argv[1:] if model else argv)
    env = dict(os.environ)
    for flag, field in SERVE_FLAGS.items():
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value is not None:
            env[Settings.ENV[field]] = value
    if args.train_barrier:
        env[Settings.ENV["barrier"]] = "1"
    if args.train_freeze_embeddings:
        env[Settings.ENV["freeze_embeddings"]] = "1"
    Settings.from_env(env)  # fail here, with the flag's name, rather than inside vLLM
    if model is None:
        from apollo_train.tiny_models import demo_model_dir

        model = str(demo_model_dir())
    env["VLLM_PLUGINS"] = PLUGIN_NAMES
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *vllm_args]
    return cmd, env


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"serve", "train", "demo"}
    if not argv or argv[0] not in commands:
        print(
            "usage: apollo-train serve [MODEL] [--train-* flags] [vLLM flags]\n"
            "       apollo-train train MODEL_DIR DATA.jsonl [--optimizer ...] [--out DIR]\n"
            "       apollo-train demo [--port N]",
            file=sys.stderr,
        )
        return 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        try:
            cmd, env = serve_command(rest)
        except ValueError as exc:
            print(f"apollo-train serve: {exc}", file=sys.stderr)
            return 2
        os.execvpe(cmd[0], cmd, env)
    if command == "train":
        from worker.offline import main as train_main

        return train_main(rest)
    from apollo_train.demo import main as demo_main

    return demo_main(rest)


if __name__ == "__main__":
    sys.exit(main())
