"""`apollo-train`: serve a model with in-place training, train offline, run the demo, or act on a running
server as its client (post, status, checkpoint, checkpoints, restore, cancel: apollo_train/commands.py)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from apollo_train.shared.config import (
    LOAD_FORMAT,
    LOAD_FORMAT_RANDOM,
    PLUGIN_NAMES,
    WORKER_EXTENSION,
    Settings,
)

# vLLM's load formats that read a safetensors checkpoint as ours does; `dummy` is vLLM's random weights.
CHECKPOINT_FORMATS = ("auto", "safetensors", "hf")
CPU_KV_CACHE_SHARE = 0.25  # of the machine's memory, for the CPU build's KV cache when the user sets none


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apollo-train serve",
        usage="apollo-train serve [MODEL] [--train-* flags] [vLLM flags]",
        description="Start vLLM's OpenAI server with the training routes (/train, /train/status, /train/cancel, "
        "/checkpoint). Flags not listed here go to vLLM. With no MODEL, a tiny built-in demo model is served.",
    )
    for field in dataclasses.fields(Settings):
        help = f"{field.metadata['help']} (env {Settings.env_name(field.name)})"
        if field.type == "bool":
            parser.add_argument(Settings.flag(field.name), dest=field.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help)
        else:
            parser.add_argument(Settings.flag(field.name), dest=field.name, metavar=field.name.upper(), help=help)
    return parser


def serve_command(argv: list[str], environ=os.environ) -> tuple[list[str], dict[str, str]]:
    """The vLLM server command line and environment for `apollo-train serve [MODEL] [flags]`."""
    parser = serve_parser()
    if argv and argv[0] in ("-h", "--help"):
        parser.print_help()
        raise SystemExit(0)
    # MODEL comes first if given; argparse would take a vLLM flag's value for it.
    model = argv[0] if argv and not argv[0].startswith("-") else None
    args, vllm_args = parser.parse_known_args(argv[1:] if model else argv)
    env = dict(environ)
    for field in dataclasses.fields(Settings):
        value = getattr(args, field.name)
        if value is not None:
            env[Settings.env_name(field.name)] = ("1" if value else "0") if isinstance(value, bool) else value
    Settings.from_env(env)  # fail here, with the flag's name, rather than inside vLLM
    if model is None:
        from apollo_train.tiny_models import demo_model_dir

        model = str(demo_model_dir())
    env["VLLM_PLUGINS"] = PLUGIN_NAMES
    if _cpu_build() and not env.get("VLLM_CPU_KVCACHE_SPACE"):
        # Unset, the CPU build takes nearly all free memory for its KV cache and the worker has none.
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(_memory_gib() * CPU_KV_CACHE_SHARE)))
    ranks = int(_split_flag(vllm_args, ("--tensor-parallel-size", "-tp"))[0] or 1)
    if _cpu_build() and ranks > 1 and not env.get("VLLM_CPU_OMP_THREADS_BIND"):
        # The CPU build binds each rank to a NUMA node of its own and refuses when there are fewer
        # nodes than ranks (most machines have one): give each rank its share of this process's cores.
        split = split_cores(sorted(os.sched_getaffinity(0)), ranks)
        if split and _numa_nodes() < ranks:
            env["VLLM_CPU_OMP_THREADS_BIND"] = split
    vllm_args = with_our_loader(vllm_args)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *vllm_args]
    return cmd, env


def split_cores(cores: list[int], ranks: int) -> str | None:
    """`cores` in `ranks` equal runs, as VLLM_CPU_OMP_THREADS_BIND spells them ("0,1|2,3"); None if too few."""
    per = len(cores) // ranks
    if per == 0:
        return None
    return "|".join(",".join(map(str, cores[r * per:(r + 1) * per])) for r in range(ranks))


def _numa_nodes() -> int:
    return len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))) or 1


def _split_flag(args: list[str], names: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """The value of the last of `names` in a command line (`--flag V` or `--flag=V`; None if absent), and
    the command line without them."""
    value, rest, i = None, [], 0
    while i < len(args):
        name, eq, given = args[i].partition("=")
        if name in names:
            if not eq:
                i += 1
                given = args[i] if i < len(args) else ""
            value = given
        else:
            rest.append(args[i])
        i += 1
    return value, rest


def with_our_loader(vllm_args: list[str]) -> list[str]:
    """vLLM's arguments with our load format (in place of vLLM's checkpoint or dummy formats) and our
    worker extension; another load format or extension is passed through (training then says why
    it is unavailable)."""
    load_format, out = _split_flag(vllm_args, ("--load-format",))
    extension, out = _split_flag(out, ("--worker-extension-cls",))
    if load_format in (None, *CHECKPOINT_FORMATS):
        load_format = LOAD_FORMAT
    elif load_format == "dummy":
        load_format = LOAD_FORMAT_RANDOM
    return [*out, "--load-format", load_format, "--worker-extension-cls", extension or WORKER_EXTENSION]


def _cpu_build() -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm-cpu")
        return True
    except PackageNotFoundError:
        return False


def _memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def main(argv: list[str] | None = None) -> int:
    from apollo_train import commands

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in commands.COMMANDS:
        return commands.main(argv)
    if not argv or argv[0] not in ("serve", "train", "demo"):
        print(
            "usage: apollo-train serve [MODEL] [--train-* flags] [vLLM flags]\n"
            "       apollo-train train MODEL_DIR DATA.jsonl [--optimizer ...] [--out DIR]\n"
            "       apollo-train demo [--port N]\n"
            "       apollo-train post DATA.jsonl [--epochs N] [--lr X] [--strip I ...] [--force] [--wait]\n"
            "       apollo-train status [--follow]\n"
            "       apollo-train checkpoint [NAME] [--wait] | checkpoints | restore ID [--wait] | cancel JOB_ID\n"
            "client commands take --url URL (APOLLO_TRAIN_URL) and --api-key KEY (APOLLO_TRAIN_API_KEY); "
            "`apollo-train COMMAND -h` tells more",
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
