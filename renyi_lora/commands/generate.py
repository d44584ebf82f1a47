"""``renyi-lora generate``: flags, loading, generation and the plain-text printout."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from renyi_lora.commands.common import ROUTE_EXAMPLES_HELP, ModelArguments, route_weights
from renyi_lora.data.records import SFT_FORMATS
from renyi_lora.data.sources import read_typed_records
from renyi_lora.evaluation.generate import GenerationResult, Mixture, Mode, check_generation, generate
from renyi_lora.evaluation.inference import Prompt, load_for_inference
from renyi_lora.evaluation.report import format_number


@dataclass
class GenerateArguments(ModelArguments):
    """Flags of ``renyi-lora generate``."""

    adapters: str | None = field(default=None, metadata={"help": "Saved ensemble folder."})
    prompt: list[str] | None = field(default=None, metadata={"help": "A prompt; repeat the flag for several.",
                                     "action": "extend"})
    prompts_file: str | None = field(default=None, metadata={"help": "Text file with one prompt per line (blank "
                                     "lines skipped)."})
    mode: Mode = field(default="mixture", metadata={"help": "mixture: tokens from the mixture (see --mixture); "
                       "members: each member's own continuation; sample: one member drawn by weight per prompt."})
    mixture: Mixture = field(default="sequence", metadata={"help": "With --mode mixture. sequence: the sequence "
                             "mixture sum_k w_k p_k(y|x) token by token, each step weighing the members by w_k times "
                             "their likelihood of the tokens so far (the predictive eval and lm-eval score); token: "
                             "the same weights w_k at every step."})
    route_on_prompt: bool = field(default=False, metadata={"help": "Weight members by their posterior given the "
                                  "prompt, w_k ∝ pi_k p_k(prompt)^alpha."})
    alpha: float = field(default=1.0, metadata={"help": "Order of the prompt posterior (with --route_on_prompt)."})
    weights: list[float] | None = field(default=None, metadata={"help": "Prior mixture weights, one per member; "
                                        "the saved ensemble's mixture weights if omitted."})
    route_examples: str | None = field(default=None, metadata={"help": ROUTE_EXAMPLES_HELP})
    members: list[int] | None = field(default=None, metadata={"help": "Use only these members of the ensemble."})
    base_only: bool = field(default=False, metadata={"help": "Generate with the base model alone (adapters off)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Maximum tokens generated per prompt."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (with --do_sample)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (with --do_sample)."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling and for drawing members."})
    chat: bool = field(default=False, metadata={"help": "Wrap each prompt as a user message and apply the chat "
                       "template (with its generation prompt)."})
    output: str | None = field(default=None, metadata={"help": "Also write the results (per-token MI) as JSON."})
    device: str = field(default="auto", metadata={"help": "'auto' (cuda if available), 'cpu', 'cuda', ..."})

    def __post_init__(self) -> None:
        if not self.prompt and not self.prompts_file:
            raise ValueError("give at least one --prompt \"...\" or --prompts_file FILE")
        for flag, path in (("--prompts_file", self.prompts_file), ("--route_examples", self.route_examples)):
            if path and not Path(path).is_file():
                raise FileNotFoundError(f"{flag} {path}: file not found")
        if not self.adapters and not self.base_only:
            raise ValueError("--adapters DIR is required (a saved ensemble), unless --base_only")
        if self.base_only and self.route_examples:
            raise ValueError("--route_examples weighs the members of --adapters; the base model alone (--base_only) "
                             "has none to weigh")
        check_generation(self.mode, self.max_new_tokens, self.temperature, self.top_p, alpha=self.alpha,
                         mixture=self.mixture)

    def prompts(self) -> list[Prompt]:
        texts = list(self.prompt or [])
        if self.prompts_file:
            texts += [line for line in Path(self.prompts_file).read_text().splitlines() if line.strip()]
        return [[{"role": "user", "content": text}] for text in texts] if self.chat else texts


def run_generate(args: GenerateArguments) -> list[GenerationResult]:
    """What ``renyi-lora generate`` does: load the model and ensemble, generate, optionally write JSON."""
    prompts = args.prompts()
    if args.route_examples:  # bad data fails before the model loads
        read_typed_records(args.route_examples, SFT_FORMATS, "--route_examples")
    adapters = [args.adapters] if args.adapters else None
    ensemble, tokenizer = load_for_inference(args.model, adapters, args.members, args.trust_remote_code,
                                             device=args.device)
    if args.chat and not tokenizer.chat_template:
        raise ValueError(f"--chat: the tokenizer of {args.model} has no chat template")
    weights = route_weights(args.route_examples, ensemble, tokenizer, args.weights)
    disabled = ensemble.adapters_disabled() if args.base_only else contextlib.nullcontext()
    with disabled:
        results = generate(ensemble, tokenizer, prompts, mode=args.mode, max_new_tokens=args.max_new_tokens,
                           do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                           route_on_prompt=args.route_on_prompt, alpha=args.alpha, weights=weights,
                           mixture=args.mixture)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
    return results


def format_results(results: list[GenerationResult], member_ids: Sequence[int] | None = None) -> str:
    """Plain text: each prompt, its weights, and each continuation as ``token(mi)`` pieces."""
    blocks = []
    for result in results:
        prompt = result.prompt if isinstance(result.prompt, str) else result.prompt[-1]["content"]
        lines = [f"prompt: {prompt!r}", "weights: " + " ".join(f"{w:.3f}" for w in result.weights)]
        for c in result.continuations:
            who = "mixture" if c.member is None else f"member {member_ids[c.member] if member_ids else c.member}"
            end = "eos" if c.finished else "max_new_tokens"
            lines.append(f"[{who}] {c.text!r}  (mean MI {format_number(c.mean_mi)}, stopped: {end})")
            lines.append("  " + " ".join(f"{t.text!r}({format_number(t.mi)})" for t in c.tokens))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
