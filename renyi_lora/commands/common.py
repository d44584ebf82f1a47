"""What the commands share: the base-model flags (the one loader of a model and its adapters for inference is
``renyi_lora.inference.load_for_inference``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from renyi_lora.models import DEFAULT_MODEL


@dataclass
class ModelArguments:
    """The base model: ``--model`` and ``--trust_remote_code`` of every command."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Base causal LM: 'smollm2-135m' (embedded, offline), "
                       "a local Hugging Face folder or a hub id."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the model folder/hub."})
