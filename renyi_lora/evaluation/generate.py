"""Generation from the ensemble, each token carrying the epistemic uncertainty (MI) of its step.

Modes:

- ``mixture``: tokens come from the mixture. All K members run on K*B member-major rows with one KV cache, and all
  of them append the chosen token. Two mixtures (``mixture=``):

  - ``"sequence"`` (default): the next-token distribution is ``sum_k w_k(t) p_k(. | x, y_<t)`` with
    ``w_k(t) ∝ w_k p_k(y_<t | x)``: the weights follow each member's fit to the tokens generated so far (Bayes'
    rule). This is the sequence mixture ``p(y | x) = sum_k w_k p_k(y | x)`` decoded token by token: the product of
    the step probabilities of a continuation is exactly its probability under the mixture that ``renyi-lora eval``
    scores and lm-eval's ``renyi`` model reports (``renyi_lora.evaluation.harness``), so all three share one predictive.
  - ``"token"``: the fixed-weight token mixture ``sum_k w_k p_k(. | x, y_<t)`` at every step. Members never drop
    out, so a continuation can switch between members' conventions mid-sentence; it is not the distribution of any
    one sequence mixture.
- ``members``: each member's own continuation, side by side (K*B rows, each following its own member). The
  MI of each token is then computed on that member's continuation by ``token_uncertainty`` (all K members
  scoring each continuation), because during decoding the other members never see it.
- ``sample``: draw one member per prompt by weight, then generate with that member alone: with ``do_sample`` an
  exact draw from the sequence mixture. The members still all run, so the MI of the mixture along the drawn
  member's continuation comes for free.

The weights ``w`` start from ``weights`` (normalised), else the ensemble's saved mixture weights pi
(``LoraEnsemble.mixture_weights``). ``route_on_prompt`` replaces them by the posterior given the prompt,
``w_k ∝ pi_k p_k(prompt)^alpha`` (alpha = 1: Bayes' rule for the mixture; alpha = 0: the prior; alpha = inf: the
best member), and ``renyi_lora.evaluation.routing.posterior_weights`` gives the posterior given a user's own
examples, to pass as ``weights`` (see ``renyi_lora.evaluation.routing``).

Each token records ``prob`` (its probability under the distribution it was drawn from, before temperature
and top-p) and ``mi`` / ``entropy`` (epistemic / total uncertainty of the mixture with the prompt's weights ``w``
at that step, in every mode: the members' disagreement about the next token, as ``token_uncertainty`` scores it
along the same text; the sequence mixture's own weights concentrate on one member within a few tokens, after which
their MI says little). Prompts are left-padded, with position ids counted from each row's first real token, so a
batch generates what each prompt generates alone; a row stops at its first EOS and is padded after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from renyi_lora.evaluation.inference import IncrementalForward, Prompt, encode_prompt, left_pad, pad_right
from renyi_lora.evaluation.routing import prompt_log_weights
from renyi_lora.evaluation.token_uncertainty import completion_scores, decompose_rows, prior_log_weights

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from renyi_lora.ensemble import LoraEnsemble

Mode = Literal["mixture", "members", "sample"]
MODES = ("mixture", "members", "sample")
Mixture = Literal["sequence", "token"]
MIXTURES = ("sequence", "token")


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


def choose_tokens(log_probs: torch.Tensor, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                  *, generator: torch.Generator | None = None) -> torch.Tensor:
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


def check_generation(mode: str, max_new_tokens: int, temperature: float, top_p: float, *, alpha: float,
                     mixture: str = "sequence") -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if mixture not in MIXTURES:
        raise ValueError(f"mixture must be one of {MIXTURES}; got {mixture!r}")
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
def generate(ensemble: LoraEnsemble, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], *,
             mode: Mode = "mixture", max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, route_on_prompt: bool = False, alpha: float = 1.0,
             weights: Sequence[float] | torch.Tensor | None = None, eos_token_id: int | list[int] | None = None,
             mixture: Mixture = "sequence") -> list[GenerationResult]:
    """Generate a continuation of every prompt (a string, or a list of chat messages rendered with the chat
    template); returns one ``GenerationResult`` per prompt. ``weights``: the prior over members (normalised; the
    ensemble's saved mixture weights if None); ``mixture``: ``"sequence"`` or ``"token"`` decoding in ``mixture``
    mode (module docstring). Under ``ensemble.adapters_disabled()`` K = 1."""
    check_generation(mode, max_new_tokens, temperature, top_p, alpha=alpha, mixture=mixture)
    K, B = ensemble.output_members, len(prompts)
    device = next(ensemble.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = torch.tensor(_eos_ids(tokenizer, ensemble, eos_token_id), dtype=torch.long, device=device)
    prompt_ids = [encode_prompt(tokenizer, prompt)[0] for prompt in prompts]
    if any(not ids for ids in prompt_ids):
        raise ValueError("a prompt encodes to no tokens; expected non-empty prompts")
    log_weights = prior_log_weights(ensemble, weights).to(device)[:, None].expand(K, B)  # [K, B]
    if route_on_prompt:
        log_weights = prompt_log_weights(ensemble, prompt_ids, alpha, log_weights[:, 0], pad_token_id=pad)
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
        mode == "mixture" and mixture == "sequence", max_new_tokens, eos, pad, generator, do_sample, temperature, top_p)

    if per_member:  # MI along each member's own continuation, from all K members scoring it
        generated = [tokens[r, : lengths[r]].tolist() for r in range(tokens.shape[0])]
        mi, total = torch.zeros_like(probs), torch.zeros_like(probs)
        for k in range(K):
            rows = slice(k * B, (k + 1) * B)
            scores = completion_scores(ensemble, *pad_right(prompt_ids, generated[rows], pad, device),
                                       log_weights=log_weights)
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
            follow: torch.Tensor, report: torch.Tensor, per_member: bool, sequence: bool, max_new_tokens: int,
            eos: torch.Tensor, pad: int, generator: torch.Generator, do_sample: bool, temperature: float,
            top_p: float):
    """The decoding loop over R rows (B shared-token rows, or K*B per-member streams when ``per_member``).

    ``follow [K, B]``: log weights of the distribution tokens are drawn from, updated after every token by each
    member's probability of it when ``sequence`` (the sequence mixture); ``report [K, B]``: those of the mixture
    whose uncertainty is recorded. Returns ``tokens, probs, mi, total`` ``[R, L]`` (padding after
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
        token = choose_tokens(distribution, do_sample, temperature, top_p, generator=generator)
        token = token.masked_fill(done, pad)  # finished rows pad
        prob = distribution.gather(-1, token[:, None]).squeeze(-1).exp()
        if sequence:  # Bayes' rule: w_k(t+1) ∝ w_k(t) p_k(token); finished rows update on padding, unused
            member = log_probs.gather(-1, token[None, :, None].expand(log_probs.shape[0], -1, 1)).squeeze(-1)  # [K, B]
            follow = torch.log_softmax(follow + member.to(follow), dim=0)
        steps.append((token, prob, mi.float(), total.float()))
        lengths += ~done
        done |= torch.isin(token, eos)
        if done.all():
            break
        step_input = token[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(R, 1)], dim=1)
    tokens, probs, mi, total = (torch.stack(column, dim=1) for column in zip(*steps, strict=True))
    return tokens, probs, mi, total, lengths.tolist(), done.tolist()
