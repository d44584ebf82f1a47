"""Numbers as text and reports on disk: table formatting, the evaluation table and its Markdown report with plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from renyi_lora.evaluation.plots import mi_histogram, reliability_diagram, routing_heatmap


def format_number(value) -> str:
    """Floats with 3 decimals, below 5e-4 in scientific notation (tiny MIs of nearly identical members would all
    print as 0.000); None as '-'; anything else as ``str``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1e}" if 0 < abs(value) < 5e-4 else f"{value:.3f}"
    return str(value)


def format_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned; cells by ``format_number``."""
    cells = [list(header)] + [[format_number(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(text.ljust(w) if i == 0 else text.rjust(w) for i, (text, w) in enumerate(zip(row, widths,
                                                                                                  strict=True)))
             for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def results_table(results: dict) -> str:
    """The printed summary of ``evaluate_multiple_choice``'s results: metrics, error detection, routing."""
    def row(label: str, n: int, metrics: dict, uncertainty: tuple) -> list:
        return [label, n, metrics["accuracy"], metrics["ece"], metrics["nll"], metrics["brier"], *uncertainty]

    def mixture_row(label: str, block: dict) -> list:
        m = block["mixture"]
        return row(label, block["num_items"], m, (m["total"], m["aleatoric"], m["epistemic"]))

    names = [f"member {k}" for k in results["member_ids"]] if not results["base_only"] else ["base model"]
    rows = [mixture_row("mixture" if not results["base_only"] else "base model", results)]
    if results["num_members"] > 1:
        rows += [row(name, results["num_items"], m, (m["entropy"], None, None))
                 for name, m in zip(names, results["members"], strict=True)]
    rows += [mixture_row(f"group {name}", block) for name, block in results["groups"].items()]
    header = ["", "n", "acc", "ECE", "NLL", "Brier", "total", "aleatoric", "MI"]
    m = results["mixture"]
    detection = format_table(["errors vs uncertainty", "AUROC(MI)", "AUROC(total)", "AURC(total)", "AURC(MI)"],
                             [["all items", m["auroc_mi_errors"], m["auroc_total_errors"], m["aurc"], m["aurc_mi"]]])
    routing = results["routing_matrix"]
    routing_rows = [[f"group {g}", *r] for g, r in zip(routing["groups"], routing["matrix"], strict=True)]
    routing_rows.append(["all items", *results["routing"]])
    routing_table = format_table(["responsibility for the correct answer", *names], routing_rows)
    return "\n\n".join([format_table(header, rows), detection, routing_table])


def write_report(results: dict, output: str | Path) -> list[Path]:
    """Write the results JSON to ``output`` and next to it ``<stem>_reliability.png``, ``<stem>_routing.png``,
    ``<stem>_mi_histogram.png`` and ``<stem>_report.md`` (the table and the figures); returns the paths."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    stem, items = output.parent / output.stem, results["items"]
    title = "base model" if results["base_only"] else f"mixture of {results['num_members']} members"
    reliability = reliability_diagram([max(i["probs"]) for i in items], [i["correct"] for i in items],
                                      f"{stem}_reliability.png", title=f"Reliability, {title}")
    routing = routing_heatmap(results["routing_matrix"]["matrix"], results["routing_matrix"]["groups"],
                              f"{stem}_routing.png", title="Responsibility for the correct answer (alpha = 1)")
    by_group = {name: [i["epistemic"] for i in items if i["group"] == name] for name in results["groups"]}
    histogram = mi_histogram(by_group, f"{stem}_mi_histogram.png", title="Mutual information by group")
    report = Path(f"{stem}_report.md")
    figures = "\n\n".join(f"![{p.stem}]({p.name})" for p in (reliability, routing, histogram))
    report.write_text(f"# Multiple-choice evaluation ({title})\n\nResults: `{output.name}`\n\n```\n"
                      f"{results_table(results)}\n```\n\n{figures}\n")
    return [output, reliability, routing, histogram, report]


def sft_results_table(results: dict) -> str:
    """The printed summary of ``evaluate_sft``'s results: NLL of the mixture, members and groups; NLL and routing per
    group and member; the NMI between groups and owning members."""
    names = [f"member {k}" for k in results["member_ids"]] if not results["base_only"] else ["base model"]
    weights = "weights: " + " ".join(f"{w:.3f}" for w in results["weights"])
    if results["route_on_prompt"]:
        weights += ", then routed on each prompt (pi_k p_k(prompt))"
    lines = [f"{results['num_examples']} examples, {results['num_tokens']} target tokens "
             f"({results['num_truncated']} truncated to {results['max_length']}); {weights}"]
    rows = [["mixture" if not results["base_only"] else "base model", results["num_examples"], results["num_tokens"],
             results["mixture"]["nll"], results["mixture"]["nll_per_token"]]]
    if results["num_members"] > 1:
        rows += [[name, results["num_examples"], results["num_tokens"], m["nll"], m["nll_per_token"]]
                 for name, m in zip(names, results["members"], strict=True)]
    rows += [[f"group {name}", g["num_examples"], g["num_tokens"], g["mixture"]["nll"], g["mixture"]["nll_per_token"]]
             for name, g in results["groups"].items()]
    tables = [format_table(["", "n", "tokens", "NLL", "NLL/token"], rows)]
    groups = results["groups"].items()
    tables.append(format_table(["NLL per example", "mixture", *names],
                               [[f"group {name}", g["mixture"]["nll"], *[m["nll"] for m in g["members"]]]
                                for name, g in groups]))
    routing = [[f"group {name}", *g["responsibility"]] for name, g in groups]
    routing.append(["all examples", *results["responsibility"]])
    tables.append(format_table(["mean responsibility", *names], routing))
    nmi = results["nmi"]
    lines.append("\n\n".join(tables))
    lines.append("NMI(group, owning member): " + (format_number(nmi) if nmi is not None else "- (fewer than 2 groups)"))
    return "\n\n".join(lines)


def write_sft_report(results: dict, output: str | Path) -> list[Path]:
    """Write ``evaluate_sft``'s results JSON to ``output`` and next to it ``<stem>_routing.png`` and
    ``<stem>_report.md`` (the table and the figure); returns the paths."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    stem = output.parent / output.stem
    routing = routing_heatmap(results["routing_matrix"]["matrix"], results["routing_matrix"]["groups"],
                              f"{stem}_routing.png", title="Mean responsibility by group (held-out SFT data)")
    report = Path(f"{stem}_report.md")
    report.write_text(f"# SFT evaluation ({results['num_members']} members)\n\nResults: `{output.name}`\n\n```\n"
                      f"{sft_results_table(results)}\n```\n\n![{routing.stem}]({routing.name})\n")
    return [output, routing, report]
