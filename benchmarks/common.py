"""Shared pieces of the benchmarks: models, batches, the PEFT baselines, the interleaved timing loop, tables.

Timing rule (the VM is a noisy 2-core machine shared with other jobs): every configuration lives in one
process, each round runs every case once in a rotated order, and we report medians over the timed rounds
after warm-up. Ratios are taken per round (both sides measured seconds apart) and reported as
``median [min-max]`` over the rounds: absolute times drift, paired ratios hold.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# With other jobs on the 2 cores, OpenMP's default spin-waiting makes a 2-thread step up to 40x slower (a thread
# spins at each barrier while its partner is descheduled); passive waiting removes that. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import itertools  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble  # noqa: E402
from renyi_lora.likelihoods import IGNORE_INDEX  # noqa: E402
from renyi_lora.objective import renyi_loss, routed_loss  # noqa: E402

THREADS = 2
RANK = 8
LORA_ALPHA = 16.0  # scaling 2, as in the prototype
LEARNING_RATE = 2e-4
QV = ["q_proj", "v_proj"]
ALL_LINEAR = ["all-linear"]
PEFT_ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# "tiny": the test suite's random Llama (tests/conftest.py make_llama: hidden 32, 2 layers); "small": 4x wider with a
# 1000-token vocabulary, where a step is already compute-bound on 2 cores (see benchmarks/README.md).
RANDOM_CONFIGS = {
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 64, "vocab_size": 128},
    "small": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
              "intermediate_size": 256, "vocab_size": 1000},
}


@dataclass
class Setting:
    """Shapes and repetition counts of one run (``--model`` x ``--quick``)."""

    model: str  # "tiny", "small" or "smollm2"
    batch: int  # B examples per member
    length: int  # T tokens; the completion is the second half
    members: list[int]  # the K sweep
    warmup: int
    rounds: int
    steps: int  # consecutive timed calls per case per round (their median is the round's time)
    top_layers: int  # LoRA only on the top this-many layers for the shared-trunk rows


def setting(model: str, quick: bool) -> Setting:
    if model in RANDOM_CONFIGS:
        return Setting(model, 4, 128, [1, 2, 4, 8], warmup=1 if quick else 2, rounds=3 if quick else 10,
                       steps=3 if quick else 5, top_layers=1)
    return Setting("smollm2", 4, 128, [1, 4] if quick else [1, 4, 8], warmup=1, rounds=1 if quick else 2, steps=1,
                   top_layers=6)


def parse_args(doc: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", choices=[*RANDOM_CONFIGS, "smollm2"], default="tiny")
    parser.add_argument("--quick", action="store_true", help="fewer members and rounds (a smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (overrides the default)")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 deprecation notices
    try:
        import datasets

        datasets.disable_progress_bar()
    except ImportError:
        pass
    return args


def resolve_setting(args: argparse.Namespace) -> Setting:
    chosen = setting(args.model, args.quick)
    if args.rounds is not None:
        chosen.rounds = args.rounds
    return chosen


def print_header(title: str, chosen: Setting, shapes: str | None = None) -> None:
    """Markdown header: the machine, date, exact command, and the shapes (``shapes`` overrides the SFT default)."""
    print(f"## {title}\n")
    print(f"- machine: {platform.machine()} {os.cpu_count()}-core CPU VM, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), "
          f"transformers {transformers.__version__}")
    print(f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}; command: "
          f"`{' '.join(['python', *sys.argv])}`")
    print(f"- model: {chosen.model}; " + (shapes or f"B={chosen.batch}, T={chosen.length} (completion = second "
          f"half), LoRA r={RANK}, lora_alpha={LORA_ALPHA:g}; {timing_line(chosen)}") + "\n", flush=True)


def timing_line(chosen: Setting) -> str:
    return f"{chosen.warmup} warm-up + {chosen.rounds} timed rounds x {chosen.steps} steps per case, cases interleaved"


# --------------------------------------------------------------------------------------------------- models


def load_base(model: str) -> tuple[torch.nn.Module, object | None]:
    """The frozen base LM (eval mode, float32) and its tokenizer (None for the tiny random Llama)."""
    if model in RANDOM_CONFIGS:
        torch.manual_seed(0)
        config = LlamaConfig(**RANDOM_CONFIGS[model], max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
                             bos_token_id=None)
        return LlamaForCausalLM(config).eval(), None
    from renyi_lora.models import load_model_and_tokenizer

    base, tokenizer = load_model_and_tokenizer("smollm2-135m", torch_dtype=torch.float32)
    return base.eval(), tokenizer


def char_tokenizer():
    """The test suite's character-level tokenizer (``tests/conftest.py``), for TRL's constructor on the tiny model."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("renyi_lora_test_conftest", repo_root() / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_tokenizer()


def shared_copy(base: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of ``base`` holding the same weight tensors (the base is frozen, so sharing is safe)."""
    memo = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    return copy.deepcopy(base, memo)


def make_ensemble(base: torch.nn.Module, members: int, targets: list[str] = QV, layers: list[int] | None = None,
                  shared_trunk: bool = True) -> LoraEnsemble:
    config = EnsembleConfig(num_members=members, rank=RANK, lora_alpha=LORA_ALPHA, target_modules=targets,
                            layers_to_transform=layers, init_seed=0)
    ensemble = LoraEnsemble(shared_copy(base), config)
    if not shared_trunk:
        ensemble.shared_trunk_layers = 0  # the pre-hooks stay but do nothing: every layer runs on K*B rows
    return ensemble


def top_layers(base: torch.nn.Module, count: int) -> list[int]:
    total = base.config.num_hidden_layers
    return list(range(total - count, total))


def peft_lora_config(targets: list[str] = QV, layers: list[int] | None = None):
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets,
                      layers_to_transform=layers)


def make_peft(base: torch.nn.Module, members: int, targets: list[str] = QV, layers: list[int] | None = None):
    """A PEFT model with adapters ``m0 .. m{K-1}`` (PEFT's own init) on a weight-sharing copy of ``base``."""
    from peft import get_peft_model

    model = get_peft_model(shared_copy(base), peft_lora_config(targets, layers), adapter_name="m0")
    for k in range(1, members):
        model.add_adapter(f"m{k}", peft_lora_config(targets, layers))
    return model


def adapter_names(members: int) -> list[str]:
    return [f"m{k}" for k in range(members)]


def peft_parameters(model, names: list[str]) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n and any(f".{a}." in n for a in names)]


def adamw(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LEARNING_RATE)


# --------------------------------------------------------------------------------------------------- data


def sft_batch(vocab: int, batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens ``[B, T]``, full attention, labels = tokens on the second half (-100 on the prompt)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab, (batch, length), generator=generator)
    labels = input_ids.clone()
    labels[:, : length // 2] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


# --------------------------------------------------------------------------------------------------- steps


def logits_sequence_loglik(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What a PEFT user writes: float32 cross-entropy of ``logits [B, T, V]`` on the shifted labels -> ``[B]``."""
    B, T, V = logits.shape
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(B, T - 1).sum(-1)


def peft_sequence_loglik(model, batch: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                   **kwargs).logits
    return logits_sequence_loglik(logits, batch["labels"])


def ours_sft_step(ensemble: LoraEnsemble, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                  alpha: float = 1.0) -> None:
    """One step: one forward over K*B rows, ``routed_loss`` (sequence routing), backward, AdamW."""
    optimizer.zero_grad(set_to_none=True)
    token = ensemble(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])  # [K, B, T]
    loss, _, _ = routed_loss(token, batch["labels"] != IGNORE_INDEX, alpha)
    loss.backward()
    optimizer.step()


def peft_sft_step(model, names: list[str], optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                  renyi: bool, alpha: float = 1.0) -> None:
    """The PEFT loop: per adapter ``set_adapter``, re-enable requires_grad on all adapters, one forward.

    ``renyi=True``: keep all K graphs and do one backward of ``renyi_loss`` (the same objective as ours);
    ``renyi=False``: the plain loop, ``-mean L_k`` backward per adapter (alpha = 0 objective, K backwards).
    """
    optimizer.zero_grad(set_to_none=True)
    logliks = []
    for name in names:
        model.set_adapter(name)
        model.set_requires_grad(names, True)  # set_adapter froze every other adapter
        loglik = peft_sequence_loglik(model, batch)  # [B]
        if renyi:
            logliks.append(loglik)
        else:
            (-loglik.mean()).backward()
    if renyi:
        renyi_loss(torch.stack(logliks), alpha)[0].backward()
    optimizer.step()


# --------------------------------------------------------------------------------------------------- timing


@dataclass
class Timings:
    """Seconds per call, one entry per timed round, on two clocks.

    ``wall``: elapsed time. ``cpu``: this process's CPU time (all threads, ``time.process_time``), which leaves
    out the time the process waits while other jobs hold the cores, so its ratios move less on the shared VM
    (it does include the extra work that a cache thrashed by those jobs causes).
    """

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]

    def clocks(self) -> dict[str, dict[str, list[float]]]:
        return {"wall clock": self.wall, "process CPU time": self.cpu}


def run_interleaved(cases: dict[str, Callable[[], object]], warmup: int, rounds: int, steps: int = 1,
                    progress: bool = True) -> Timings:
    """Time every case: per round, the median of ``steps`` consecutive calls, on both clocks.

    ``warmup`` untimed rounds first; the case order is rotated every round so that no case always follows
    the same neighbour.
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    timings = Timings({name: [] for name in names}, {name: [] for name in names})
    for r in range(rounds):
        started = time.perf_counter()
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            gc.collect()
            wall, cpu = [], []
            for _ in range(steps):
                start, start_cpu = time.perf_counter(), time.process_time()
                cases[name]()
                wall.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            timings.wall[name].append(statistics.median(wall))
            timings.cpu[name].append(statistics.median(cpu))
        if progress:
            print(f"  round {r + 1}/{rounds}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return timings


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(numerator: list[float], denominator: list[float], scale: float = 1.0) -> str:
    """``median [min-max]`` over rounds of ``numerator[r] / (scale * denominator[r])``."""
    ratios = [n / (scale * d) for n, d in zip(numerator, denominator, strict=True)]
    return f"{median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"


def ms(values: list[float]) -> str:
    return f"{1000 * median(values):.1f}"


def seconds(values: list[float]) -> str:
    return f"{median(values):.2f}"


def spread(values: list[float]) -> str:
    """Relative spread of one case's times over the rounds: (max - min) / median."""
    return f"{(max(values) - min(values)) / median(values):.0%}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
