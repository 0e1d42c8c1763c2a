"""The ``pocketrlhf`` command: one sub-command per job, each with its own typed config.

    pocketrlhf <command> [POSITIONAL] [--config run.yaml] [--option value ...]
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import shlex
import sys
from dataclasses import dataclass
from typing import Any

from pocketrlhf import __version__
from pocketrlhf.config import help_text, parse_args
from pocketrlhf.errors import PocketError


@dataclass(frozen=True)
class Command:
    module: str
    config: str
    function: str
    summary: str
    positional: tuple[str, ...] = ()


COMMANDS: dict[str, Command] = {
    "demo": Command("pocketrlhf.demo", "DemoConfig", "run", "the whole pipeline on a built-in task and a tiny local model"),
    "sft": Command("pocketrlhf.stages.sft", "SFTConfig", "train", "supervised fine-tuning of an adapter on a frozen base"),
    "rm": Command("pocketrlhf.stages.rm", "RMConfig", "train", "reward model: adapter + scalar head trained on ranked pairs"),
    "ppo": Command("pocketrlhf.stages.ppo", "PPOConfig", "train", "PPO with a KL penalty; policy, reference, value and reward share one base"),
    "grpo": Command("pocketrlhf.stages.grpo", "GRPOConfig", "train",
                    "critic-free online RL (GRPO, RLOO, REINFORCE++) with rule rewards and/or a reward adapter"),
    "dpo": Command("pocketrlhf.stages.dpo", "DPOConfig", "train", "DPO (sigmoid/cDPO, robust, hinge, IPO) on preference pairs; the reference is an adapter switch"),
    "score": Command("pocketrlhf.stages.rm", "ScoreConfig", "score", "score texts or pairs with a reward adapter"),
    "chat": Command("pocketrlhf.serve.chat", "ChatConfig", "run", "chat in the terminal with a base model or an adapter (streamed)", ("model",)),
    "serve": Command("pocketrlhf.serve.api", "ServeConfig", "run", "OpenAI-compatible HTTP API: the base and every adapter on one copy of it", ("model",)),
    "data stackexchange": Command("pocketrlhf.data.stackexchange", "StackExchangeConfig", "run",
                                  "StackLLaMA's paired data (finetune/reward/rl/evaluation) from a Stack Exchange Posts.xml dump", ("input",)),
    "merge": Command("pocketrlhf.merge", "MergeConfig", "run", "merge an adapter into its 16-bit base and save the model as safetensors", ("adapter",)),
    "push": Command("pocketrlhf.hub", "PushConfig", "run", "upload an adapter or merged model folder to the Hugging Face Hub",
                    ("dir", "repo_id")),
    "plan": Command("pocketrlhf.plan", "PlanConfig", "run", "memory planner: will a stage fit on a GPU? (reads config.json only)", ("model",)),
    "pipeline": Command("pocketrlhf.pipeline", "PipelineConfig", "run",
                        "data -> SFT -> reward model -> PPO/DPO -> evaluation in one resumable run", ("config",)),
    "evaluate": Command("pocketrlhf.evaluate", "EvaluationConfig", "run",
                        "compare base, SFT and RLHF policies: reward score, win rate, KL, samples"),
    "report": Command("pocketrlhf.report", "ReportConfig", "run", "plots and a markdown summary of a run", ("run_dir",)),
    "env": Command("pocketrlhf.env", "EnvConfig", "run", "versions, devices and bitsandbytes kernel check (for bug reports)"),
}


def resume_command(command: str, argv: list[str], cfg: Any) -> str | None:
    """The command line that continues an interrupted ``command`` run, or None when it has no run
    to continue (not a training command, or no output folder)."""
    if command == "pipeline":
        return shlex.join(["pocketrlhf", command, *argv])  # re-running resumes the pipeline
    if command == "demo":
        kept = [a for a in argv if a not in ("--resume", "--no-resume")]
        return shlex.join(["pocketrlhf", command, *kept, "--resume"])
    if not isinstance(getattr(cfg, "resume", None), str) or not getattr(cfg, "output_dir", ""):
        return None
    kept, i = [], 0
    while i < len(argv):
        key = argv[i].split("=", 1)[0].replace("_", "-")
        if key == "--resume":
            i += 1 if "=" in argv[i] else 2
            continue
        if key in ("--overwrite", "--no-overwrite"):
            has_value = "=" not in argv[i] and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            i += 2 if has_value else 1
            continue
        kept.append(argv[i])
        i += 1
    return shlex.join(["pocketrlhf", command, *kept, "--resume", "auto"])


def usage() -> str:
    lines = [f"pocketrlhf {__version__}: RLHF (SFT, reward model, PPO, DPO) on one GPU, every role on one frozen base.",
             "", "usage: pocketrlhf <command> [--config FILE] [--option value ...]", "", "commands:"]
    lines += [f"  {name:<18} {cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += ["", "Run 'pocketrlhf <command> --help' for a command's options."]
    return "\n".join(lines)


def group_usage(group: str) -> str:
    """The sub-commands of a two-word command group such as ``data``."""
    lines = [f"usage: pocketrlhf {group} <command> [--option value ...]", "", "commands:"]
    lines += [f"  {name:<18} {cmd.summary}" for name, cmd in COMMANDS.items() if name.startswith(f"{group} ")]
    lines += ["", f"Run 'pocketrlhf {group} <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        status = _main(argv)
        sys.stdout.flush()  # a closed pipe surfaces here, inside the try, not at interpreter exit
        return status
    except BrokenPipeError:
        # `pocketrlhf sft --help | head`: the reader left. Point stdout at devnull so that Python's
        # final flush does not raise again (https://docs.python.org/3/library/signal.html#note-on-sigpipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a real file (captured in tests)
            pass
        return 1


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    # Two-word commands ("data stackexchange").
    if rest and f"{name} {rest[0]}" in COMMANDS:
        name, rest = f"{name} {rest[0]}", rest[1:]
    groups = {n.split()[0] for n in COMMANDS if " " in n}
    if name in groups and (not rest or rest[0] in ("-h", "--help", "help")):
        print(group_usage(name))
        return 0 if rest else 2
    if name not in COMMANDS:
        if name in groups:
            subs = [n.split()[1] for n in COMMANDS if n.startswith(f"{name} ")]
            close = difflib.get_close_matches(rest[0], subs, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            print(f"error: unknown command '{name} {rest[0]}'{hint}; the {name} commands are {', '.join(subs)}",
                  file=sys.stderr)
            return 2
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"error: unknown command '{name}'{hint}; run 'pocketrlhf --help' for the list", file=sys.stderr)
        return 2
    cmd = COMMANDS[name]
    module = importlib.import_module(cmd.module)
    config_cls = getattr(module, cmd.config)
    if "-h" in rest or "--help" in rest:
        print(help_text(config_cls, name, cmd.summary, cmd.positional))
        return 0
    try:
        cfg = parse_args(config_cls, rest, cmd.positional)
        getattr(module, cmd.function)(cfg)
    except PocketError as e:
        logging.getLogger("pocketrlhf").debug("error", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ""
        if name in ("sft", "rm", "ppo", "dpo", "pipeline", "demo"):  # the commands with a run to continue

            try:
                again = resume_command(name, rest, parse_args(config_cls, rest, cmd.positional))
            except PocketError:
                again = None
            hint = f"; continue with: {again}" if again else ""
        print(f"\ninterrupted{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
