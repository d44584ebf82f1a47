"""``renyi-lora <command> [flags]``: a thin veneer that parses flags into the library's dataclasses.

Each command's flags come from dataclass fields (their help text is the documentation), parsed by
transformers' ``HfArgumentParser``, so every ``TrainingArguments`` flag works as it does in the Trainer.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import fields

from transformers import HfArgumentParser, TrainingArguments

COMMANDS: dict[str, tuple[str, Callable[[list[str]], None]]] = {}


def command(name: str, summary: str):
    def register(function: Callable[[list[str]], None]):
        COMMANDS[name] = (summary, function)
        return function

    return register


def _parse(prog: str, types: tuple, argv: list[str]):
    parser = HfArgumentParser(types, prog=f"renyi-lora {prog}")
    _group_flags(parser, types)
    try:
        return parser.parse_args_into_dataclasses(argv)
    except (ValueError, FileNotFoundError) as error:  # raised by the dataclasses' __post_init__ checks
        parser.error(str(error))


def _group_flags(parser: HfArgumentParser, types: tuple) -> None:
    """``--help`` lists renyi-lora's own flags first, then the Trainer's (``TrainingArguments``) in a group of their
    own, instead of one list where ``--num_members`` and ``--alpha`` come after ``--local_rank``."""
    if not any(issubclass(t, TrainingArguments) for t in types):
        return
    trainer_flags = {f.name for f in fields(TrainingArguments)}
    ours = parser.add_argument_group("renyi-lora: the model, the data, the ensemble and the objective")
    theirs = parser.add_argument_group("transformers.TrainingArguments: the Trainer's own flags (as in TRL)")
    for action in list(parser._actions):
        if action.dest == "help":
            continue
        for group in parser._action_groups:
            if action in group._group_actions:
                group._group_actions.remove(action)
        (theirs if action.dest in trainer_flags else ours)._group_actions.append(action)
    rest = [g for g in parser._action_groups if g not in (ours, theirs) and g._group_actions]
    parser._action_groups[:] = [*rest, ours, theirs]


@command("sft", "Train an ensemble of LoRA members by supervised fine-tuning with the alpha-Renyi objective.")
def sft(argv: list[str]) -> None:
    from renyi_lora.commands.train import DataArguments, TrainModelArguments, print_routing, run_sft
    from renyi_lora.config import RenyiConfig

    model_args, data_args, config = _parse("sft", (TrainModelArguments, DataArguments, RenyiConfig), argv)
    print_routing(run_sft(model_args, data_args, config, argv))
    _end_processes()


@command("dpo", "Train an ensemble by preference optimisation (alpha-Renyi DPO, one shared reference forward).")
def dpo(argv: list[str]) -> None:
    from renyi_lora.commands.train import DataArguments, TrainModelArguments, print_routing, run_dpo
    from renyi_lora.config import DPOConfig

    model_args, data_args, config = _parse("dpo", (TrainModelArguments, DataArguments, DPOConfig), argv)
    print_routing(run_dpo(model_args, data_args, config, argv))
    _end_processes()


@command("eval", "Multiple-choice evaluation: calibration, uncertainty and routing of the mixture, members, groups.")
def evaluate(argv: list[str]) -> None:
    from renyi_lora.commands.eval import EvalArguments, print_results, run_eval

    (args,) = _parse("eval", (EvalArguments,), argv)
    print_results(run_eval(args))
    if args.output:
        print(f"\nwrote {args.output} and, next to it, the plots and the report")


@command("generate", "Generate from the ensemble (mixture, each member, or a sampled member) with per-token MI.")
def generate(argv: list[str]) -> None:
    from renyi_lora.commands.generate import GenerateArguments, format_results, run_generate

    (args,) = _parse("generate", (GenerateArguments,), argv)
    print(format_results(run_generate(args), args.members))


@command("demo", "Soft specialists at work: train K=4 at alpha 0, 1, 4 and K=1 on generated data, evaluate, report.")
def demo(argv: list[str]) -> None:
    from renyi_lora.demo import DemoArguments, run_demo

    (args,) = _parse("demo", (DemoArguments,), argv)
    run_demo(args)


@command("critical-alpha", "Estimate alpha*, above which members separate, at one trained adapter on a data set.")
def critical_alpha(argv: list[str]) -> None:
    from renyi_lora.commands.critical_alpha import CriticalAlphaArguments, report, run_critical_alpha

    (args,) = _parse("critical-alpha", (CriticalAlphaArguments,), argv)
    result, _ = run_critical_alpha(args)
    print(report(result))
    if args.output:
        print(f"wrote {args.output}")


def _end_processes() -> None:
    """Under torchrun: wait for every process, then tear the process group down before the interpreter exits (left to
    interpreter shutdown, its threads were seen to abort a process that finished first: SIGABRT, exit -6)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<16}{summary}" for name, (summary, _) in COMMANDS.items()]
        print("usage: renyi-lora <command> [--help] [flags]\n\ncommands:\n" + "\n".join(lines))
        sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    from renyi_lora.training.model_card import PushError

    try:
        COMMANDS[argv[0]][1](argv[1:])
    except (FileNotFoundError, ValueError, FloatingPointError, PushError) as error:
        # DataError is a ValueError (bad input: exit 2); NonFiniteError a FloatingPointError and PushError (a failed
        # upload to the Hub, after the outputs were written) exit 1. One line each.
        if os.environ.get("RENYI_LORA_DEBUG"):
            raise
        print(f"renyi-lora {argv[0]}: error: {error}", file=sys.stderr)
        sys.exit(1 if isinstance(error, (FloatingPointError, PushError)) else 2)


if __name__ == "__main__":
    main()
