"""Member upkeep between optimizer steps: learned mixture weights and the revival of dead members.

Every ``member_update_steps`` optimizer steps the trainer measures each member's *load*, its mean responsibility
over the examples of those steps (``[K]``, summing to 1), and hands it here.

- Learned weights (``learn_weights``): ``pi <- load``. For any alpha > 0 this is the EM update of pi for the
  alpha-Renyi data term: ``sum_b log sum_k pi_k exp(alpha L[k, b])`` is maximised over pi, with the responsibilities
  held fixed, by their mean. Groups are rarely equal in size, and pi is then what the mixture predictive, eval and
  generate use. No update during the alpha warm-up, whose routing is a transient; a last update at the end of
  training takes the mean responsibility over the whole training set (one no-grad pass), so that the saved pi does
  not carry one window's sampling noise.
- Revival (``revive_threshold``): routing is ``softmax(alpha L + log pi)`` with ``L`` summed over a completion, so on
  long completions a lead of a few dozen nats, which members build on the text every example shares long before they
  differ on anything that matters, hands one member every example. The others get ``exp(-alpha * lead)`` of the
  gradient, learn nothing, and never come back: the ensemble is one adapter and ``K - 1`` dead members. A member whose
  load falls below the threshold is replaced by a copy of the most loaded member with a little noise (its optimizer
  moments copied too), and the two share that member's weight: the split of EM for mixtures. The copies fit the shared
  text equally well, so from then on routing sees only where examples differ, and the copies separate along the
  largest disagreement, or stay one function (and keep their shares) where the data have none.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

# A copy starts this far from its source (relative to the RMS of each parameter slice): enough to break the tie,
# small enough that both start with the source's fit of the data.
REVIVAL_NOISE = 0.01
# Learned weights never reach exactly 0 (log pi = -inf would leave a member no way back, even by revival's split).
MIN_WEIGHT = 1e-6


def dead_members(load: torch.Tensor, threshold: float) -> list[tuple[int, int]]:
    """Which members to revive and from which: ``[(dead, source), ...]``.

    Args:
        load: ``[K]`` mean responsibility of each member (sums to 1).
        threshold: a member with load below it is dead (0 = never).

    Returns:
        Each dead member paired with the most loaded member at that point; a source's load is halved by each copy
        taken from it, so several dead members spread over the live ones. Empty if every member is dead or alive.
    """
    load = load.double().clone()
    dead = [k for k in range(len(load)) if load[k] < threshold]
    if len(dead) == len(load):
        return []
    plan = []
    for member in sorted(dead, key=lambda k: load[k].item()):
        live = load.clone()
        live[dead] = -1.0
        source = int(live.argmax())
        load[source] /= 2
        plan.append((member, source))
    return plan


@torch.no_grad()
def clone_member(parameters: list[torch.Tensor], optimizer_state: dict, dead: int, source: int, *, noise: float,
                 generator: torch.Generator) -> None:
    """Overwrite member ``dead`` of every stacked parameter ``[K, ...]`` with member ``source`` plus Gaussian noise of
    standard deviation ``noise`` times the RMS of the source's slice, and copy the optimizer's per-parameter moments
    (every state tensor shaped like the parameter, e.g. Adam's ``exp_avg`` and ``exp_avg_sq``) the same way, without
    noise. ``generator`` (a CPU generator) makes the noise identical on every process."""
    for parameter in parameters:
        values = parameter.data[source]
        scale = values.float().pow(2).mean().sqrt().item()
        draw = torch.randn(values.shape, generator=generator).to(values)
        parameter.data[dead] = values + noise * scale * draw
        for state in optimizer_state.get(parameter, {}).values():
            if isinstance(state, torch.Tensor) and state.shape == parameter.shape:
                state[dead] = state[source]


def split_weights(weights: torch.Tensor, plan: list[tuple[int, int]]) -> torch.Tensor:
    """Mixture weights ``[K]`` after ``plan``: each copy and its source share the source's weight."""
    weights = weights.clone()
    for dead, source in plan:
        weights[dead] = weights[source] = weights[source] / 2
    return weights / weights.sum()


def set_weights(weights: torch.Tensor, load: torch.Tensor) -> None:
    """The EM update ``pi <- load`` in place (``[K]``), never below ``MIN_WEIGHT``."""
    load = load.double().clamp(min=MIN_WEIGHT)
    weights.copy_((load / load.sum()).to(weights))


class MemberUpkeep:
    """The trainer's side of the above: sums each member's responsibilities over the examples of the last
    ``member_update_steps`` optimizer steps (``add``), then updates pi and revives dead members (``step``).

    Under DDP every process computes the same all-reduced load and draws the same noise, so the members stay
    identical across processes. Sharded parameters (FSDP, DeepSpeed ZeRO-3) cannot be sliced by member: there the
    weights are still learned, and a dead member is reported but not revived.
    """

    def __init__(self, args: Any) -> None:
        self.args = args
        self.active = args.learn_weights or args.revive_threshold > 0
        self.load: torch.Tensor | None = None  # [K + 1]: responsibility sums, then the number of examples
        self._warned = False

    def add(self, w: torch.Tensor) -> None:
        """Count the responsibilities ``w [K, B]`` of one training batch."""
        if self.active:
            batch = torch.cat([w.detach().float().sum(1), w.new_tensor([w.shape[1]], dtype=torch.float32)])
            self.load = batch if self.load is None else self.load + batch

    def step(self, trainer: Any) -> None:
        """After an optimizer step: every ``member_update_steps`` steps, update pi and revive dead members."""
        args, step = self.args, trainer.state.global_step + 1  # the step just computed
        if not self.active or self.load is None or step % args.member_update_steps:
            return
        totals = trainer.accelerator.reduce(self.load, "sum") if trainer.accelerator.num_processes > 1 else self.load
        self.load = None
        load = (totals[:-1] / totals[-1].clamp(min=1)).cpu()  # [K]
        ensemble = trainer.ensemble
        weights = ensemble.mixture_weights
        if args.learn_weights and not trainer.in_alpha_warmup:  # the warm-up's routing is a transient
            set_weights(weights, load)
        plan = dead_members(load, args.revive_threshold) if args.revive_threshold > 0 else []
        if not plan:
            return
        entry = {"step": step, "revived": [list(pair) for pair in plan], "load": [round(x, 8) for x in load.tolist()]}
        if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
            if not self._warned:
                logger.warning("step %d: member(s) %s are dead (load %s) but cannot be revived with sharded parameters",
                               step, [dead for dead, _ in plan], entry["load"])
                self._warned = True
            return
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        for dead, source in plan:
            clone_member(ensemble.lora_parameters(), optimizer.state, dead, source, noise=REVIVAL_NOISE,
                         generator=generator)
        if args.learn_weights:
            weights.copy_(split_weights(weights, plan))
        trainer.state.log_history.append(entry)  # saved in checkpoints' trainer_state.json with the rest
        logger.info("step %d: revived member(s) %s as noisy copies of %s (their loads were %s)", step,
                    [dead for dead, _ in plan], [source for _, source in plan],
                    [entry["load"][dead] for dead, _ in plan])
