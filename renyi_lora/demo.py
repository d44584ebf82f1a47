"""``renyi-lora demo``: soft specialists at work on the embedded SmolLM2-135M, offline, in minutes on a CPU.

Trains K = 4 members at alpha = 0 (the plain ensemble), 1 (the mixture) and 4 (toward winner-take-all), and a
single adapter (K = 1) the same way, on data generated in code (``demo_data``): two personas that share every
prompt and disagree on the spelling convention (conflicting, identifiable: three decisions per example), and
capital cities that everyone agrees on (consistent). Then it evaluates each with ``evaluate_multiple_choice``,
shows what each member generates with the mixture's per-token MI, and writes ``report.md`` with the plots.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from renyi_lora.data import SFTCollator, load_multiple_choice, load_sft_dataset
from renyi_lora.demo_data import CONFLICTING, CONSISTENT, write_demo_data
from renyi_lora.ensemble import LoraEnsemble
from renyi_lora.evaluate import evaluate_multiple_choice, format_number, format_table
from renyi_lora.generate import generate
from renyi_lora.models import DEFAULT_MODEL, load_model_and_tokenizer
from renyi_lora.plots import bar_chart, routing_heatmap
from renyi_lora.train import RenyiConfig, RenyiTrainer, routing_summary

logger = logging.getLogger(__name__)


@dataclass
class DemoArguments:
    output_dir: str = field(default="demo_output", metadata={"help": "Where data, ensembles, plots and report go."})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Base model (the embedded SmolLM2-135M by default)."})
    alphas: list[float] = field(default_factory=lambda: [0.0, 1.0, 4.0], metadata={"help": "Renyi orders to train."})
    num_members: int = field(default=4, metadata={"help": "K for the ensembles (a K = 1 adapter is trained too)."})
    max_steps: int = field(default=48, metadata={"help": "Optimizer steps per training run."})
    batch_size: int = field(default=8, metadata={"help": "Examples per step (per member)."})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate."})
    top_layers: int = field(default=4, metadata={"help": "Adapt only the top N decoder layers; the layers below run "
                            "once on B rows (a shared trunk), which keeps the demo fast on a CPU."})
    seed: int = field(default=0, metadata={"help": "Seed for the data, the adapters and the data order."})
    quick: bool = field(default=False, metadata={"help": "A smaller run: half the steps and alphas 0 and 4 only."})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)."})
    real_text: Literal["no", "yes", "only"] = field(default="no", metadata={"help": "Part 2 on real text (gensim's "
                                                    "word analogies, demo_real): 'yes' after part 1, 'only' instead."})

    def __post_init__(self) -> None:
        if self.quick:
            self.max_steps, self.alphas = max(self.max_steps // 2, 1), [0.0, 4.0]
        if self.num_members < 2 or self.max_steps < 1 or any(a < 0 for a in self.alphas):
            raise ValueError("need --num_members >= 2, --max_steps >= 1 and alphas >= 0")
        if self.real_text not in ("no", "yes", "only"):
            raise ValueError(f"--real_text must be 'no', 'yes' or 'only'; got {self.real_text!r}")
        if self.real_text != "no":
            from renyi_lora.analogy_data import questions_path

            questions_path()  # no gensim: fail before any training, naming the pip command


def _train(args: DemoArguments, tokenizer, dataset, alpha: float, num_members: int, out: Path) -> tuple:
    model, _ = load_model_and_tokenizer(args.model, torch_dtype=torch.float32)
    layers = model.config.num_hidden_layers
    config = RenyiConfig(
        output_dir=str(out), alpha=alpha, num_members=num_members, rank=8, lora_alpha=16,
        layers_to_transform=list(range(layers - args.top_layers, layers)), max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=32, learning_rate=args.learning_rate,
        lr_scheduler_type="constant", seed=args.seed, save_strategy="no", report_to="none", logging_steps=12,
        use_cpu=not torch.cuda.is_available(),
    )
    ensemble = LoraEnsemble(model, config.ensemble_config())
    trainer = RenyiTrainer(model=ensemble, args=config, group_names=dataset.group_names, train_dataset=dataset,
                           data_collator=SFTCollator(tokenizer.pad_token_id))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    ensemble.save_pretrained(out)
    return ensemble.eval(), routing_summary(trainer, dataset, dataset.group_names), seconds


def _group_mean(results: dict, groups: tuple[str, ...], key: str) -> float:
    values = [results["groups"][g]["mixture"][key] for g in groups if g in results["groups"]]
    return sum(values) / len(values)


def run_demo(args: DemoArguments) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.real_text == "only":
        from renyi_lora.demo_real import run_real_text  # lazy: demo_real imports this module

        return {"real_text": run_real_text(args)}
    out = Path(args.output_dir)
    paths = write_demo_data(out / "data", seed=args.seed)
    print(f"data written to {out / 'data'}: " + ", ".join(p.name for p in paths.values()))
    _, tokenizer = load_model_and_tokenizer(args.model, torch_dtype=torch.float32)
    dataset = load_sft_dataset(paths["sft_train"], tokenizer, max_length=64)
    items = load_multiple_choice(paths["mc_test"])
    runs = [(f"K={args.num_members}, alpha={a:g}", a, args.num_members) for a in args.alphas]
    runs.append(("single adapter (K=1)", 1.0, 1))
    summary = {"runs": {}, "data": {k: str(v) for k, v in paths.items()}}
    ensembles = {}
    for name, alpha, num_members in runs:
        print(f"\n== training {name}: {args.max_steps} steps on {len(dataset)} examples ==")
        folder = out / (f"alpha_{alpha:g}" if num_members > 1 else "single")
        ensemble, routing, seconds = _train(args, tokenizer, dataset, alpha, num_members, folder)
        results = evaluate_multiple_choice(ensemble, tokenizer, items, batch_size=32)
        results.pop("items")
        summary["runs"][name] = {"alpha": alpha, "num_members": num_members, "train_seconds": seconds,
                                 "seconds_per_step": seconds / args.max_steps, **routing, "eval": results}
        ensembles[name] = ensemble
    _show(summary, out)
    demo_name = next((n for n, a, k in runs if k > 1 and a == 1.0), runs[-2][0])
    summary["generations"] = _generations(ensembles[demo_name], tokenizer, demo_name)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _report(summary, out)
    print(f"\nreport: {out / 'report.md'}")
    if args.real_text == "yes":
        from renyi_lora.demo_real import run_real_text

        summary["real_text"] = run_real_text(args)
    return summary


def _show(summary: dict, out: Path) -> None:
    rows, accuracy_rows = [], []
    for name, run in summary["runs"].items():
        results = run["eval"]
        conflicting, consistent = _group_mean(results, CONFLICTING, "epistemic"), _group_mean(
            results, CONSISTENT, "epistemic")
        run["mi_conflicting"], run["mi_consistent"] = conflicting, consistent
        rows.append([name, conflicting, consistent, conflicting / max(consistent, 1e-12), run["seconds_per_step"]])
        for group, block in results["groups"].items():
            best = max(m["accuracy"] for m in block["members"])
            accuracy_rows.append([name, group, block["mixture"]["accuracy"], best])
    print("\nmean mutual information (epistemic) of the mixture on held-out multiple choice:")
    print(format_table(["run", "MI conflicting", "MI consistent", "ratio", "s/step"],
                       [[r[0], *map(format_number, r[1:])] for r in rows]))
    print("\naccuracy per group (conflicting groups share prompts, so no single predictor exceeds ~0.5 on both):")
    print(format_table(["run", "group", "mixture", "best member"],
                       [[r[0], r[1], *map(format_number, r[2:])] for r in accuracy_rows]))
    print("\nrouting over the training set (mean responsibility per member):")
    for name, run in summary["runs"].items():
        if run["num_members"] > 1:
            print(f"  {name}")
            for group, row in run["routing"].items():
                print(f"    {group:>10}: " + "  ".join(f"{w:.2f}" for w in row))


def _generations(ensemble: LoraEnsemble, tokenizer, name: str) -> list[dict]:
    prompts = ["Rewrite in house style: color, center, honor\n", "Capitals of: France, Japan, Peru\n"]
    print(f"\nwhat each member of {name} writes (greedy), and the mixture with its per-token MI:")
    records = []
    for prompt in prompts:
        members = generate(ensemble, tokenizer, [prompt], mode="members", max_new_tokens=12)[0].to_dict()
        mixture = generate(ensemble, tokenizer, [prompt], mode="mixture", max_new_tokens=12)[0].to_dict()
        print(f"  prompt: {prompt.strip()!r}")
        for k, continuation in enumerate(members["continuations"]):
            print(f"    member {k}: {continuation['text'].strip()!r}")
        tokens = mixture["continuations"][0]["tokens"]
        print("    mixture:  " + " ".join(f"{t['text']!r}({t['mi']:.2f})" for t in tokens))
        records.append({"prompt": prompt, "members": members, "mixture": mixture})
    return records


def _report(summary: dict, out: Path) -> None:
    images = out / "images"
    lines = ["# renyi-lora demo", "", "Command: `renyi-lora demo` (`make demo`). Base model: SmolLM2-135M-Instruct.",
             "", "## Routing (group x member mean responsibility, training set)", ""]
    for name, run in summary["runs"].items():
        if run["num_members"] > 1:
            groups = list(run["routing"])
            slug = f"routing_alpha_{run['alpha']:g}.png"
            routing_heatmap([run["routing"][g] for g in groups], groups, images / slug, title=name)
            lines.append(f"![{name}](images/{slug})")
    names = list(summary["runs"])
    bar_chart({"conflicting": [summary["runs"][n]["mi_conflicting"] for n in names],
               "consistent": [summary["runs"][n]["mi_consistent"] for n in names]}, names, images / "mi.png",
              title="Mean MI of the mixture on held-out multiple choice", ylabel="mutual information (nats)")
    lines += ["", "## Epistemic uncertainty: conflicting vs consistent prompts", "", "![MI](images/mi.png)", "",
              "| run | MI conflicting | MI consistent | ratio | s/step |", "|---|---|---|---|---|"]
    for name, run in summary["runs"].items():
        ratio = run["mi_conflicting"] / max(run["mi_consistent"], 1e-12)
        lines.append(f"| {name} | {run['mi_conflicting']:.4f} | {run['mi_consistent']:.2g} | {ratio:.3g} | "
                     f"{run['seconds_per_step']:.2f} |")
    lines += ["", "## Accuracy per group (held-out multiple choice)", "", "| run | group | mixture | best member |",
              "|---|---|---|---|"]
    for name, run in summary["runs"].items():
        for group, block in run["eval"]["groups"].items():
            best = max(m["accuracy"] for m in block["members"])
            lines.append(f"| {name} | {group} | {block['mixture']['accuracy']:.2f} | {best:.2f} |")
    lines += ["", "## Generations", ""]
    for record in summary["generations"]:
        lines.append(f"Prompt `{record['prompt'].strip()}`:")
        for k, continuation in enumerate(record["members"]["continuations"]):
            lines.append(f"- member {k}: `{continuation['text'].strip()}`")
        tokens = record["mixture"]["continuations"][0]["tokens"]
        lines.append("- mixture (token, MI): " + " ".join(f"`{t['text']}` ({t['mi']:.2f})" for t in tokens))
        lines.append("")
    (out / "report.md").write_text("\n".join(lines) + "\n")
