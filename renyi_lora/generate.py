"""Generation from the ensemble, each token carrying the epistemic uncertainty (MI) of its step.

Modes:

- ``mixture``: at every step the next-token distribution is the weighted mixture ``sum_k w_k p_k``. All K
  members run on K*B member-major rows with one KV cache, and all of them append the chosen token.
- ``members``: each member's own continuation, side by side (K*B rows, each following its own member). The
  MI of each token is then computed on that member's continuation by ``token_uncertainty`` (all K members
  scoring each continuation), because during decoding the other members never see it.
- ``sample``: draw one member per prompt by weight, then generate with that member alone. The members still
  all run, so the MI of the mixture along the drawn member's continuation comes for free.

``route_on_prompt`` replaces the weights by the posterior given the prompt, ``w_k ∝ pi_k p_k(prompt)^alpha``
(alpha = 1: Bayes' rule for the mixture; alpha = 0: the prior; alpha = inf: the best member).

Each token records ``prob`` (its probability under the distribution it was drawn from, before temperature
and top-p) and ``mi`` / ``entropy`` (epistemic / total uncertainty of the weighted mixture at that step).
Prompts are left-padded, with position ids counted from each row's first real token, so a batch
generates what each prompt generates alone; a row stops at its first EOS and is padded after it.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from renyi_lora.models import DEFAULT_MODEL
from renyi_lora.objective import responsibilities
from renyi_lora.token_uncertainty import (
    Prompt,
    active_members,
    completion_scores,
    decompose_rows,
    encode_prompt,
    normalised_log_weights,
    pad_right,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from renyi_lora.ensemble import LoraEnsemble

Mode = Literal["mixture", "members", "sample"]
MODES = ("mixture", "members", "sample")


@dataclass
class GeneratedToken:
    id: int
    text: str
    prob: float  # probability under the distribution the token was drawn from (before temperature / top-p)
    mi: float  # mutual information (epistemic uncertainty) of the mixture's next-token distribution, nats
    entropy: float  # total entropy of the mixture's next-token distribution, nats


@dataclass
class Continuation:
    member: int | None  # the member that generated it (members / sample modes); None for the mixture
    text: str
    tokens: list[GeneratedToken]
    finished: bool  # stopped on EOS (else max_new_tokens ran out)
    mean_mi: float


@dataclass
class GenerationResult:
    prompt: Prompt
    weights: list[float]  # the mixture weights used for this prompt (after route_on_prompt)
    continuations: list[Continuation] = field(default_factory=list)  # 1 (mixture, sample) or K (members)

    def to_dict(self) -> dict:
        return asdict(self)


class IncrementalForward:
    """Next-token logits of all K members, with one KV cache across calls.

    ``per_member_rows=False``: every member sees the same tokens; ``input_ids`` is ``[B, t]`` and the rows are
    repeated K times inside (or only from the first adapted layer, when the ensemble shares a trunk).
    ``per_member_rows=True``: ``input_ids`` is ``[K*B, t]`` member-major, one stream per (member, prompt).
    """

    def __init__(self, ensemble: LoraEnsemble, per_member_rows: bool = False) -> None:
        self.ensemble, self.per_member_rows, self.cache = ensemble, per_member_rows, None
        parameters = inspect.signature(ensemble.model.forward).parameters
        # transformers 5 renamed past_key_values to cache; older versions only know the former.
        self.cache_name = "cache" if "cache" in parameters else "past_key_values"
        self.keep_last = "logits_to_keep" in parameters

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """``input_ids [R, t]`` (the new tokens), ``attention_mask [R, S]`` (everything so far, left-padded)
        -> logits at the last position ``[K, B, V]`` (every new position ``[K, B, t, V]`` if not ``last_only``)."""
        K, t = active_members(self.ensemble), input_ids.shape[1]
        # Positions count real tokens only, so a left-padded row matches the same prompt unpadded.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
        kwargs = {self.cache_name: self.cache, "use_cache": True}
        if self.keep_last and last_only:
            kwargs["logits_to_keep"] = 1
        if self.per_member_rows:
            out = self.ensemble.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      **kwargs)
        else:
            with self.ensemble._shared_trunk(input_ids.shape[0]) as shared:
                if K > 1 and not shared:
                    input_ids, attention_mask, position_ids = (x.repeat(K, 1) for x in (input_ids, attention_mask,
                                                                                       position_ids))
                out = self.ensemble.model(input_ids=input_ids, attention_mask=attention_mask,
                                          position_ids=position_ids, **kwargs)
        self.cache = getattr(out, self.cache_name)
        if not last_only:
            return out.logits.view(K, -1, *out.logits.shape[1:])  # [K, B, t, V]
        logits = out.logits[:, -1]  # [K*B, V]
        return logits.view(K, -1, logits.shape[-1])  # [K, B, V]


def left_pad(rows: list[list[int]], pad_token_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[B, S]`` with each row padded on the left, so that the last position of
    every row is its last real token."""
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, row in enumerate(rows):
        input_ids[b, length - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[b, length - len(row):] = 1
    return input_ids.to(device), attention_mask.to(device)


def choose_tokens(log_probs: torch.Tensor, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy (first maximum) or sampled tokens ``[R]`` from ``log_probs [R, V]``, with temperature and nucleus
    (top-p: the smallest set of most probable tokens whose mass reaches top_p; the top token always stays)."""
    if not do_sample:
        return log_probs.argmax(-1)
    logits = log_probs / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the mass before a token already reaches top_p
        logits = torch.full_like(logits, -torch.inf).scatter(-1, order, sorted_logits.masked_fill(drop, -torch.inf))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def prompt_log_weights(ensemble: LoraEnsemble, prompt_ids: list[list[int]], alpha: float = 1.0,
                       log_prior: torch.Tensor | None = None, pad_token_id: int = 0) -> torch.Tensor:
    """Posterior over members given each prompt, ``log w [K, B]`` with ``w_k ∝ pi_k p_k(prompt)^alpha``.

    ``p_k(prompt)`` is member k's likelihood of the prompt's tokens after its first (which has no context).
    """
    K = active_members(ensemble)
    log_prior = normalised_log_weights(None, K) if log_prior is None else log_prior
    device = next(ensemble.parameters()).device
    input_ids, attention_mask, labels = pad_right([[] for _ in prompt_ids], prompt_ids, pad_token_id, device)
    loglik = ensemble(input_ids, attention_mask, labels=labels).sum(-1).double()  # [K, B]
    return responsibilities(loglik, alpha, log_prior.to(loglik)).log()  # [K, B]


def _check(mode: str, max_new_tokens: int, temperature: float, top_p: float, alpha: float) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0 (or inf); got {alpha}")


def _eos_ids(tokenizer: PreTrainedTokenizerBase, ensemble: LoraEnsemble, eos_token_id) -> list[int]:
    """EOS ids: the argument, else the tokenizer's and the model's generation config's (which may list several)."""
    if eos_token_id is not None:
        return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(ensemble.model, "generation_config", None), "eos_token_id", None)
    ids |= set(config_eos) if isinstance(config_eos, (list, tuple)) else {config_eos}
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(ensemble: LoraEnsemble, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
             mode: Mode = "mixture", max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, route_on_prompt: bool = False, alpha: float = 1.0,
             weights: Sequence[float] | None = None, eos_token_id: int | list[int] | None = None,
             ) -> list[GenerationResult]:
    """Generate a continuation of every prompt (a string, or a list of chat messages rendered with the chat
    template); returns one ``GenerationResult`` per prompt. Under ``ensemble.adapters_disabled()`` K = 1."""
    _check(mode, max_new_tokens, temperature, top_p, alpha)
    K, B = active_members(ensemble), len(prompts)
    device = next(ensemble.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = torch.tensor(_eos_ids(tokenizer, ensemble, eos_token_id), dtype=torch.long, device=device)
    prompt_ids = [encode_prompt(tokenizer, prompt)[0] for prompt in prompts]
    if any(not ids for ids in prompt_ids):
        raise ValueError("a prompt encodes to no tokens; expected non-empty prompts")
    log_weights = normalised_log_weights(weights, K).to(device)[:, None].expand(K, B)  # [K, B]
    if route_on_prompt:
        log_weights = prompt_log_weights(ensemble, prompt_ids, alpha, log_weights[:, 0], pad)
    follow = log_weights
    members = None
    if mode == "sample":  # one member per prompt, drawn by weight; the mixture still defines the MI
        members = torch.multinomial(log_weights.T.exp().float(), 1, generator=generator).squeeze(-1)  # [B]
        follow = torch.full_like(log_weights, -torch.inf).scatter(0, members[None], 0.0)

    input_ids, attention_mask = left_pad(prompt_ids, pad, device)
    per_member = mode == "members"
    if per_member and K > 1:
        input_ids, attention_mask = input_ids.repeat(K, 1), attention_mask.repeat(K, 1)  # [K*B, S]
    tokens, probs, mi, total, lengths, finished = _decode(
        IncrementalForward(ensemble, per_member), input_ids, attention_mask, follow, log_weights, per_member,
        max_new_tokens, eos, pad, generator, do_sample, temperature, top_p)

    if per_member:  # MI along each member's own continuation, from all K members scoring it
        generated = [tokens[r, : lengths[r]].tolist() for r in range(tokens.shape[0])]
        mi, total = torch.zeros_like(probs), torch.zeros_like(probs)
        for k in range(K):
            rows = slice(k * B, (k + 1) * B)
            scores = completion_scores(ensemble, *pad_right(prompt_ids, generated[rows], pad, device), log_weights)
            for b in range(B):
                r, n = k * B + b, len(prompt_ids[b])
                mi[r, : lengths[r]] = scores.epistemic[b, n: n + lengths[r]]
                total[r, : lengths[r]] = scores.total[b, n: n + lengths[r]]

    results = []
    for b, prompt in enumerate(prompts):
        result = GenerationResult(prompt, log_weights[:, b].exp().tolist())
        for r in ([k * B + b for k in range(K)] if per_member else [b]):
            n = lengths[r]
            ids = tokens[r, :n].tolist()
            pieces = [GeneratedToken(i, tokenizer.decode([i]), p, m, h) for i, p, m, h in
                      zip(ids, probs[r, :n].tolist(), mi[r, :n].tolist(), total[r, :n].tolist(), strict=True)]
            member = r // B if per_member else (int(members[b]) if members is not None else None)
            result.continuations.append(Continuation(
                member, tokenizer.decode(ids, skip_special_tokens=True), pieces, bool(finished[r]),
                sum(m.mi for m in pieces) / max(n, 1)))
        results.append(result)
    return results


def _decode(forward: IncrementalForward, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            follow: torch.Tensor, report: torch.Tensor, per_member: bool, max_new_tokens: int, eos: torch.Tensor,
            pad: int, generator: torch.Generator, do_sample: bool, temperature: float, top_p: float):
    """The decoding loop over R rows (B shared-token rows, or K*B per-member streams when ``per_member``).

    ``follow [K, B]``: log weights of the distribution tokens are drawn from; ``report [K, B]``: those of the
    mixture whose uncertainty is recorded. Returns ``tokens, probs, mi, total`` ``[R, L]`` (padding after
    each row's end), ``lengths [R]`` (tokens kept, EOS included) and ``finished [R]`` (stopped on EOS).
    """
    R = input_ids.shape[0]
    done = torch.zeros(R, dtype=torch.bool, device=input_ids.device)
    lengths = torch.zeros(R, dtype=torch.long, device=input_ids.device)
    steps: list[tuple[torch.Tensor, ...]] = []
    step_input = input_ids
    for _ in range(max_new_tokens):
        log_probs = torch.log_softmax(forward(step_input, attention_mask).float(), dim=-1)  # [K, B, V]
        if per_member:
            distribution = log_probs.reshape(R, -1)  # [K*B, V]: stream r follows member r // B
            mi = total = torch.zeros(R, device=log_probs.device)
        else:
            distribution = torch.logsumexp(log_probs + follow.to(log_probs)[..., None], dim=0)  # [B, V]
            total, _, mi = decompose_rows(log_probs, report)
        token = choose_tokens(distribution, do_sample, temperature, top_p, generator)
        token = token.masked_fill(done, pad)  # finished rows pad
        prob = distribution.gather(-1, token[:, None]).squeeze(-1).exp()
        steps.append((token, prob, mi.float(), total.float()))
        lengths += ~done
        done |= torch.isin(token, eos)
        if done.all():
            break
        step_input = token[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(R, 1)], dim=1)
    tokens, probs, mi, total = (torch.stack(column, dim=1) for column in zip(*steps, strict=True))
    return tokens, probs, mi, total, lengths.tolist(), done.tolist()


@dataclass
class GenerateArguments:
    """Flags of ``renyi-lora generate``."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Base causal LM: 'smollm2-135m' (embedded), a local "
                       "Hugging Face folder or a hub id."})
    adapters: str | None = field(default=None, metadata={"help": "Saved ensemble folder."})
    prompt: list[str] | None = field(default=None, metadata={"help": "A prompt; repeat the flag for several.",
                                     "action": "extend"})
    prompts_file: str | None = field(default=None, metadata={"help": "Text file with one prompt per line (blank "
                                     "lines skipped)."})
    mode: Mode = field(default="mixture", metadata={"help": "mixture: the weighted mixture's next token; members: "
                       "each member's own continuation; sample: one member drawn by weight per prompt."})
    route_on_prompt: bool = field(default=False, metadata={"help": "Weight members by their posterior given the "
                                  "prompt, w_k ∝ pi_k p_k(prompt)^alpha."})
    alpha: float = field(default=1.0, metadata={"help": "Order of the prompt posterior (with --route_on_prompt)."})
    weights: list[float] | None = field(default=None, metadata={"help": "Prior mixture weights, one per member; "
                                        "uniform if omitted."})
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
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the model folder/hub."})

    def __post_init__(self) -> None:
        if not self.prompt and not self.prompts_file:
            raise ValueError("give at least one --prompt \"...\" or --prompts_file FILE")
        if self.prompts_file and not Path(self.prompts_file).is_file():
            raise FileNotFoundError(f"--prompts_file {self.prompts_file}: file not found")
        if not self.adapters and not self.base_only:
            raise ValueError("--adapters DIR is required (a saved ensemble), unless --base_only")
        _check(self.mode, self.max_new_tokens, self.temperature, self.top_p, self.alpha)

    def prompts(self) -> list[Prompt]:
        texts = list(self.prompt or [])
        if self.prompts_file:
            texts += [line for line in Path(self.prompts_file).read_text().splitlines() if line.strip()]
        return [[{"role": "user", "content": text}] for text in texts] if self.chat else texts


def run_generate(args: GenerateArguments) -> list[GenerationResult]:
    """What ``renyi-lora generate`` does: load the model and ensemble, generate, optionally write JSON."""
    from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble
    from renyi_lora.models import check_model_exists, load_model_and_tokenizer, resolve_device

    prompts = args.prompts()
    check_model_exists(args.model)
    model, tokenizer = load_model_and_tokenizer(args.model, args.trust_remote_code, torch_dtype=torch.float32)
    model.to(resolve_device(args.device)).eval()
    if args.chat and not tokenizer.chat_template:
        raise ValueError(f"--chat: the tokenizer of {args.model} has no chat template")
    if args.adapters:
        ensemble = LoraEnsemble.from_pretrained(model, args.adapters, members=args.members)
    else:
        ensemble = LoraEnsemble(model, EnsembleConfig(num_members=1))
    disabled = ensemble.adapters_disabled() if args.base_only else contextlib.nullcontext()
    with disabled:
        results = generate(ensemble, tokenizer, prompts, args.mode, args.max_new_tokens, args.do_sample,
                           args.temperature, args.top_p, args.seed, args.route_on_prompt, args.alpha, args.weights)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
    return results


def format_results(results: list[GenerationResult], member_ids: Sequence[int] | None = None) -> str:
    """Plain text: each prompt, its weights, and each continuation as ``token(mi)`` pieces."""
    from renyi_lora.evaluate import format_number

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
