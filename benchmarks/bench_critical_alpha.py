"""critical-alpha: seconds per curvature product, the old torch.func products against curvature.Linearization, and
the wall time of issue #21's scenario (`renyi-lora sft --num_members 1` for 100 steps, then `renyi-lora
critical-alpha`), on one thread.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_critical_alpha.py --before d34b285   # ~10 min, 2-core VM

Products: the tiny scenario (tests/conftest.py ``conflict_scenario``: a hidden-32 Llama, two groups answering the same
three prompts, six examples, ``--prompts`` for more; the sft adapter, rank 8 on every linear layer, P = 8192) and
SmolLM2-135M-Instruct with a rank-8 adapter on every linear layer of its top two layers (``layers_to_transform``) at a
random point, over the sixteen conflicting preference records of docs/critical_alpha.md in batches of 8. "old" is the
implementation before issue #21, kept here only for this comparison: per product, a forward-mode jvp through the
model, the head's Hessian by forward-over-reverse and a vjp that runs the model forward again (torch.func), through
the full logits [N, T, V]. "new" builds ``Linearization`` once (its build time is listed) and each product is backward
passes through the kept graphs, with the output head on the target positions alone (``completion_loglik_fn``).
Cases alternate within every round; medians over the rounds. Both give the same products (the largest relative
difference is listed).

Scenario: the two commands as subprocesses with OMP_NUM_THREADS=1, start-up included: critical-alpha with the default
flags (now ``--curvature auto``; before, ``exact``), with ``--curvature gauss-newton`` and with ``--refine_steps 100``
(L-BFGS stops short of a minimum: the default curvature meets negative curvature). ``--before REV`` runs the same
critical-alpha commands on ``git archive REV`` (the code before the change) too, each stopped after ``--timeout``
seconds.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.func import functional_call, grad, jvp, vjp  # noqa: E402

from renyi_lora.config import EnsembleConfig  # noqa: E402
from renyi_lora.data.sft import load_sft_dataset  # noqa: E402
from renyi_lora.ensemble import LoraEnsemble  # noqa: E402
from renyi_lora.likelihoods import sequence_loglik, token_logliks  # noqa: E402
from renyi_lora.models import load_tokenizer  # noqa: E402
from renyi_lora.stability.critical import (  # noqa: E402
    completion_loglik_fn,
    load_point,
    make_batches,
    member_params,
)
from renyi_lora.stability.curvature import Linearization, OutputLoglik  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PREFERENCES = [("Tea or coffee?", " Tea.", " Coffee."), ("Cats or dogs?", " Cats.", " Dogs."),
               ("Blue or red?", " Blue.", " Red."), ("Summer or winter?", " Summer.", " Winter."),
               ("Sea or mountains?", " Sea.", " Mountains."), ("Books or films?", " Books.", " Films."),
               ("Morning or evening?", " Morning.", " Evening."), ("Sweet or salty?", " Sweet.", " Salty.")]


# ------------------------------------------------------------------- the products before issue #21 (torch.func)


def old_completion_loglik_fn(ensemble: LoraEnsemble) -> OutputLoglik:
    """The log-likelihood as it was: its outputs the full logits [N, T, V] of the ensemble's forward."""

    def logits(params: dict, batch: dict) -> torch.Tensor:
        return functional_call(ensemble, params, (batch["input_ids"], batch["attention_mask"]))[0]  # [N, T, V]

    def completion_loglik(logits: torch.Tensor, batch: dict) -> torch.Tensor:
        token = token_logliks(logits[None], None, batch["labels"])  # [1, N, T]
        return sequence_loglik(token, batch["labels"], False, token.dtype)[0]  # [N]

    return OutputLoglik(logits, completion_loglik)


def old_gauss_newton(loglik_fn: OutputLoglik, params: dict, batches: list, vector: dict) -> dict:
    """G v as it was: per batch, a jvp through the outputs, the head's Hessian by forward-over-reverse, then a vjp
    (which runs the model forward again)."""
    total, count = {name: torch.zeros_like(value) for name, value in params.items()}, 0
    for batch in batches:
        outputs = partial(loglik_fn.outputs, batch=batch)

        def head_total(z, batch=batch):
            loglik = loglik_fn.head(z, batch)
            return loglik.sum(), loglik

        value, outputs_dot_v = jvp(outputs, (params,), (vector,))
        _, curved, loglik = jvp(grad(head_total, has_aux=True), (value.detach(),), (outputs_dot_v,), has_aux=True)
        _, pullback = vjp(outputs, params)
        (product,) = pullback(curved.detach())
        count += loglik.shape[0]
        for name in total:
            total[name] -= product[name]
    return {name: value / count for name, value in total.items()}


def old_hessian(loglik_fn: OutputLoglik, params: dict, batches: list, vector: dict) -> dict:
    """V v as it was: a jvp of the gradient (forward-over-reverse), per batch."""
    total, count = {name: torch.zeros_like(value) for name, value in params.items()}, 0
    for batch in batches:
        def total_loglik(p, batch=batch):
            loglik = loglik_fn(p, batch)
            return loglik.sum(), loglik

        _, product, loglik = jvp(grad(total_loglik, has_aux=True), (params,), (vector,), has_aux=True)
        count += loglik.shape[0]
        for name in total:
            total[name] -= product[name]
    return {name: value / count for name, value in total.items()}


# ------------------------------------------------------------------------------------------------ products


def largest_difference(got: dict, expected: dict) -> float:
    return max(((got[name] - expected[name]).norm() / expected[name].norm()).item() for name in expected)


def time_products(label: str, point: LoraEnsemble, batches: list, rounds: int) -> list[str]:
    """Markdown rows: seconds per G v and V v product, old and new, alternating within each round."""
    loglik_fn, old_loglik_fn = completion_loglik_fn(point), old_completion_loglik_fn(point)
    params = member_params(point)
    vector = {name: torch.randn(value.shape, generator=torch.Generator().manual_seed(0), dtype=value.dtype)
              for name, value in params.items()}
    start = time.perf_counter()
    linearization = Linearization(loglik_fn, params, batches)
    build = time.perf_counter() - start
    cases = {"G v": (partial(old_gauss_newton, old_loglik_fn, params, batches), linearization.gauss_newton),
             "V v": (partial(old_hessian, old_loglik_fn, params, batches), linearization.hessian)}
    rows = []
    for kind, (old, new) in cases.items():
        difference = largest_difference(new(vector), old(vector))  # also the warm-up
        times: dict[str, list[float]] = {"old": [], "new": []}
        for round_ in range(rounds):
            for name, product in (("old", old), ("new", new))[:: 1 if round_ % 2 == 0 else -1]:
                start = time.perf_counter()
                product(vector)
                times[name].append(time.perf_counter() - start)
        old_s, new_s = statistics.median(times["old"]), statistics.median(times["new"])
        rows.append(f"| {label} | {kind} | {old_s:.3f} | {new_s:.3f} | {old_s / new_s:.1f}x | {build:.2f} | "
                    f"{difference:.1e} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def tiny_case(scenario: Path, sft: Path) -> tuple[LoraEnsemble, list]:
    from renyi_lora.stability.critical import _load_eager

    tokenizer = load_tokenizer(str(scenario / "base"))
    dataset = load_sft_dataset(scenario / "data.jsonl", tokenizer, 256)
    point = load_point(_load_eager(str(scenario / "base"), False), sft)
    return point, make_batches(dataset, tokenizer.pad_token_id, 8, 64)


def smollm2_case(folder: Path, layers: int) -> tuple[LoraEnsemble, list]:
    from renyi_lora.stability.critical import _load_eager

    records = [{"prompt": f"Question: {question}\nAnswer:", "completion": answer, "group": group}
               for question, *answers in PREFERENCES for group, answer in zip("AB", answers, strict=True)]
    data = folder / "preferences.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    tokenizer = load_tokenizer("smollm2-135m")
    dataset = load_sft_dataset(data, tokenizer, 64)
    model = _load_eager("smollm2-135m", False)
    total = model.config.num_hidden_layers
    config = EnsembleConfig(num_members=1, rank=8, target_modules=["all-linear"],
                            layers_to_transform=list(range(total - layers, total)), init_seed=0)
    point = load_point(model, ensemble_config=config)
    torch.manual_seed(0)
    with torch.no_grad():  # a generic point: B != 0
        for layer in point.lora_layers().values():
            layer.lora_B.normal_(0, 0.01)
    return point, make_batches(dataset, tokenizer.pad_token_id, 8, 64)


# ------------------------------------------------------------------------------------------------ scenario


def run_command(argv: list[str], tree: Path, timeout: float, log: Path) -> tuple[float, str]:
    """Wall seconds of ``python -m renyi_lora.cli argv`` with ``tree`` first on the path, and how it ended: "ok",
    "timeout" or its last line of output (an error)."""
    environment = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    with log.open("w") as handle:
        try:
            subprocess.run([sys.executable, "-m", "renyi_lora.cli", *argv], env=environment, stdout=handle,
                           stderr=subprocess.STDOUT, timeout=timeout, check=True, cwd=tree)
        except subprocess.TimeoutExpired:
            return time.perf_counter() - start, "timeout"
        except subprocess.CalledProcessError:
            lines = [line for line in log.read_text().replace("\r", "\n").splitlines() if line.strip()]
            errors = [line[line.find("error:"):] for line in lines if "error:" in line]  # the CLI's one-line error
            return time.perf_counter() - start, (errors or lines or ["failed"])[-1]  # the refusal, if any
    return time.perf_counter() - start, "ok"


def scenario_row(label: str, tree: Path, base: Path, data: Path, sft: Path, flags: list[str], timeout: float,
                 folder: Path) -> str:
    name = "-".join([label.split()[0], *flags]).replace("--", "")
    output, log = folder / f"{name}.json", folder / f"{name}.log"
    seconds, ended = run_command(["critical-alpha", "--model", str(base), "--data", str(data), "--adapters",
                                  str(sft), *flags, "--output", str(output)], tree, timeout, log)
    shown = " ".join(flags) or "(defaults)"
    if ended == "timeout":
        return f"| {label} | {shown} | stopped at {seconds / 60:.1f} min, unfinished | | | | | | |"
    if ended != "ok":
        return f"| {label} | {shown} | {seconds:.0f} s: {ended[:200]} | | | | | | |"
    record = json.loads(output.read_text())
    refinement = record["refinement"]
    used = record["curvature"] + (" (fallback)" if record.get("fallback") else "")
    stopped = record.get("stopped", "converged" if record["converged"] else "not converged")
    return (f"| {label} | {shown} | {seconds:.0f} s ({seconds / 60:.1f} min) | {record['alpha_star']:.4g} | {used} | "
            f"{record['iterations']} | {record['curvature_products']} | {stopped} | {refinement['iterations']} its, "
            f"gradient norm {refinement['gradient_norm']:.3g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=None, help="a git revision to time the scenario on too (the old code)")
    parser.add_argument("--timeout", type=float, default=1800, help="stop each scenario command after this")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of the tiny products (SmolLM2: 2)")
    parser.add_argument("--smollm2_layers", type=int, default=2, help="adapted top layers of SmolLM2 (0: skip)")
    parser.add_argument("--prompts", type=int, default=3, help="prompts of the tiny scenario (2 examples each)")
    parser.add_argument("--skip_scenario", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    spec = importlib.util.spec_from_file_location("renyi_lora_test_conftest", ROOT / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)

    print("## critical-alpha: curvature products and issue #21's scenario\n")
    print(f"- machine: {platform.machine()} {os.cpu_count()}-core CPU VM, torch {torch.__version__} (1 thread), "
          f"transformers {transformers.__version__}; load average before: {os.getloadavg()[0]:.2f}")
    print(f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}; command: "
          f"`{' '.join(['python', *sys.argv])}`\n", flush=True)
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        base, data = conftest.conflict_scenario(folder, args.prompts)
        sft = folder / "sft"
        flags = ["--num_members", "1", "--max_steps", "100", "--output_dir", str(sft), "--save_strategy", "no",
                 "--report_to", "none", "--use_cpu", "--disable_tqdm", "true"]
        seconds, ended = run_command(["sft", "--model", str(base), "--data", str(data), *flags], ROOT, args.timeout,
                                     folder / "sft.log")
        if ended != "ok":
            raise RuntimeError(f"renyi-lora sft failed: {ended}")
        print("### Seconds per product (median over rounds, one thread)\n")
        print("| model | product | old (s) | new (s) | old / new | new: build once (s) | largest relative difference |")
        print("|---|---|---|---|---|---|---|", flush=True)
        rows = time_products(f"tiny scenario ({2 * args.prompts} examples, P = 8192)", *tiny_case(folder, sft),
                             args.rounds)
        if args.smollm2_layers:
            point, batches = smollm2_case(folder, args.smollm2_layers)
            size = sum(value.numel() for value in member_params(point).values())
            rows += time_products(f"SmolLM2-135M, top {args.smollm2_layers} layers (16 examples, P = {size})", point,
                                  batches, 2)
        print("\n".join(rows), flush=True)
        if args.skip_scenario:
            return
        print(f"\n### Scenario wall time (subprocesses, OMP_NUM_THREADS=1; `renyi-lora sft` took {seconds:.0f} s)\n")
        print("| code | flags | critical-alpha wall | alpha* | curvature used | Lanczos steps | products with V | "
              "stopped | refinement |")
        print("|---|---|---|---|---|---|---|---|---|", flush=True)
        trees = [("new", ROOT)]
        if args.before:
            old = folder / "before"
            old.mkdir()
            archive = subprocess.run(["git", "archive", args.before], cwd=ROOT, check=True, capture_output=True)
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
            trees.insert(0, (f"before ({args.before})", old))
        # The defaults; Gauss-Newton asked for; the refinement cut to 100 steps, short of a minimum (the default
        # curvature then meets negative curvature: the old code refused, the new one falls back).
        for flags in ([], ["--curvature", "gauss-newton"], ["--refine_steps", "100"]):
            for label, tree in trees:
                print(scenario_row(label, tree, base, data, sft, flags, args.timeout, folder), flush=True)
        print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
