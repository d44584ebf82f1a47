"""What the commands share: the base-model flags (the one loader of a model and its adapters for inference is
``renyi_lora.evaluation.inference.load_for_inference``) and the weights of ``--route_examples``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from renyi_lora.evaluation.routing import posterior_weights
from renyi_lora.models import DEFAULT_MODEL

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from renyi_lora.ensemble import LoraEnsemble

ROUTE_EXAMPLES_HELP = ("A few of your own SFT examples (.jsonl / .json / .parquet: {prompt, completion}, {messages} or "
                       "{text}): the posterior over members given them, w_k ∝ pi_k prod_j p_k(y_j|x_j), replaces the "
                       "mixture weights for everything scored or generated (personalisation without retraining).")


@dataclass
class ModelArguments:
    """The base model: ``--model`` and ``--trust_remote_code`` of every command."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Base causal LM: 'smollm2-135m' (embedded, offline), "
                       "a local Hugging Face folder or a hub id."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the model folder/hub."})


def route_weights(route_examples: str | None, ensemble: LoraEnsemble, tokenizer: PreTrainedTokenizerBase,
                  weights: Sequence[float] | None, batch_size: int = 8) -> list[float] | None:
    """``weights`` unchanged without ``--route_examples``; else the posterior given those examples (printed)."""
    if not route_examples:
        return weights
    posterior = posterior_weights(ensemble, tokenizer, route_examples, weights, batch_size=batch_size).tolist()
    print(f"posterior weights given {route_examples}: " + " ".join(f"{w:.3f}" for w in posterior), flush=True)
    return posterior
