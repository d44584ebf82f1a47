"""K LoRA members on one frozen causal LM, applied with one batched matmul per layer.

Rows are member-major: the batch is repeated K times, rows ``k*B .. (k+1)*B - 1`` belong to member k, and
each adapted layer adds ``scaling * (x_k @ A_k^T) @ B_k^T`` to the frozen base layer's output, with
``lora_A [K, R, Din]`` and ``lora_B [K, Dout, R]`` stacked so that all members run in one ``bmm``.
B starts at zero (every member starts as the base model; ``init_lora_b_std`` > 0 draws it too, a randomised
prior); A is drawn per member, which is what breaks the symmetry between members (with A tied too, members
stay identical forever).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from renyi_lora import io, likelihoods
from renyi_lora.config import EnsembleConfig, layer_dims
from renyi_lora.likelihoods import output_head_is_plain


class EnsembleLoraLayer(nn.Module):
    """A frozen ``base_layer`` plus K stacked LoRA updates applied to member-major rows."""

    def __init__(self, base_layer: nn.Module, config: EnsembleConfig, generator: torch.Generator) -> None:
        super().__init__()
        self.base_layer = base_layer
        din, dout = layer_dims(base_layer)
        K, R = config.num_members, config.rank
        weight = base_layer.weight
        # PEFT's default init (kaiming_uniform, a = sqrt(5)) is uniform(-1/sqrt(Din), 1/sqrt(Din)); drawn per member.
        bound = 1 / math.sqrt(din)
        lora_A = (torch.rand(K, R, din, generator=generator) * 2 - 1) * bound
        self.lora_A = nn.Parameter(lora_A.to(device=weight.device))  # [K, R, Din]
        lora_B = torch.randn(K, dout, R, generator=generator) * config.init_lora_b_std if config.init_lora_b_std \
            else torch.zeros(K, dout, R)
        self.lora_B = nn.Parameter(lora_B.to(device=weight.device))  # [K, Dout, R]
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.disabled = False
        self.use_reference = False  # run the frozen reference copies (ref_A, ref_B) instead of the trained ones
        self.member_slice = slice(None)  # the members that run (member chunks); rows are member-major over them

    @property
    def num_members(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [K*B, T, Din]`` member-major (or ``[B, T, Din]`` when disabled) -> same rows, ``Dout``."""
        out = self.base_layer(x)
        if self.disabled:
            return out
        A, B = (self.ref_A, self.ref_B) if self.use_reference else (self.lora_A, self.lora_B)
        A, B = A[self.member_slice], B[self.member_slice]
        xk = self.dropout(x).to(A.dtype).reshape(A.shape[0], -1, x.shape[-1])  # [K, B*T, Din]
        delta = torch.bmm(torch.bmm(xk, A.mT), B.mT)  # [K, B*T, Dout]
        return out + self.scaling * delta.reshape(out.shape).to(out.dtype)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def find_target_modules(model: nn.Module, target_modules: list[str], layers: list[int] | None = None) -> list[str]:
    """Names of the linear modules selected by ``target_modules`` (and layer indices ``layers``); raises listing
    what exists if none match."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = [n for n, m in model.named_modules() if _is_linear(m) and m is not head and n]
    if "all-linear" in target_modules:
        names = linear
    else:
        names = [n for n in linear if any(n == t or n.endswith("." + t) for t in target_modules)]
    if layers is not None:
        names = [n for n in names if (m := re.search(r"\.(\d+)\.", n)) and int(m.group(1)) in layers]
    if not names:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(
            f"target_modules {target_modules} (layers {layers}) matched no linear module of {type(model).__name__}; "
            f"linear modules here: {suffixes} (or use 'all-linear')"
        )
    return names


class LoraEnsemble(nn.Module):
    """Wraps a Hugging Face causal LM: freezes it and injects K-member LoRA into the target modules.

    ``forward(input_ids [B, T], attention_mask [B, T])`` returns logits ``[K, B, T, V]``.
    """

    def __init__(self, model: nn.Module, config: EnsembleConfig, module_names: list[str] | None = None) -> None:
        super().__init__()
        self.ensemble_config = config  # not `config`: the Trainer reads `model.config` as a transformers config
        self.model = model
        model.requires_grad_(False)
        self.plain_head = output_head_is_plain(model)  # logits = head(hidden): the fused likelihood path is exact
        self.module_names = module_names or find_target_modules(
            model, config.target_modules, config.layers_to_transform
        )
        generator = torch.Generator().manual_seed(0 if config.init_seed is None else config.init_seed)
        for name in self.module_names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, EnsembleLoraLayer(getattr(parent, child), config, generator))
        # pi, the mixture weights [K]: uniform until learned (RenyiConfig.learn_weights); saved with the adapters.
        self.register_buffer("mixture_weights", torch.full((config.num_members,), 1.0 / config.num_members),
                             persistent=False)
        self._trunk_rows: int | None = None  # B while a shared-trunk forward is running
        self._member_slice = slice(None)
        self.shared_trunk_layers = self._install_shared_trunk()

    def _install_shared_trunk(self) -> int:
        """Layers below the first adapted one are identical for every member: run them once on B rows.

        Finds the decoder's ``ModuleList`` holding every adapted module; a pre-hook on each layer from the first
        adapted one repeats the batch K times (member-major) where the rows enter it. Returns the number of
        shared layers (0: no sharing, e.g. when the embeddings' neighbours are adapted or K = 1).
        """
        found = {re.match(r"^(.*?)\.(\d+)\.", name) for name in self.module_names}
        prefixes = {m.group(1) for m in found if m}
        if self.num_members == 1 or None in found or len(prefixes) != 1:
            return 0
        layers = self.model.get_submodule(prefixes.pop())
        first = min(int(m.group(2)) for m in found)
        if not isinstance(layers, nn.ModuleList) or first == 0:
            return 0
        for layer in layers[first:]:
            layer.register_forward_pre_hook(self._repeat_rows, with_kwargs=True)
        return first

    def _repeat_rows(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Repeat every per-row tensor of a decoder layer's inputs K times (``[B, ...]`` -> ``[K*B, ...]``)."""
        B = self._trunk_rows
        if B is None:
            return None

        def repeat(value, position: int | None = None):
            if isinstance(value, tuple):
                return tuple(repeat(v) for v in value)
            # A leading dim of 1 broadcasts over the K*B rows already, except for the hidden states themselves;
            # 1-D tensors (cache positions [T]) are not per row.
            if isinstance(value, torch.Tensor) and value.dim() > 1 and value.shape[0] == B and (B > 1 or position == 0):
                return self._repeat(value)
            return value

        return tuple(repeat(a, i) for i, a in enumerate(args)), {k: repeat(v) for k, v in kwargs.items()}

    @contextmanager
    def shared_trunk(self, rows: int) -> Iterator[bool]:
        """Yields whether the trunk is shared for this forward (then the model is fed B rows, not K*B)."""
        # Under gradient checkpointing the adapted layers are recomputed during backward, outside this context,
        # where the hook could not repeat their B-row inputs: every layer then runs on K*B rows.
        share = self.shared_trunk_layers > 0 and not self.is_disabled and not (
            self.training and any(getattr(m, "gradient_checkpointing", False) for m in self.model.modules()))
        self._trunk_rows = rows if share else None
        try:
            yield share
        finally:
            self._trunk_rows = None

    @property
    def num_members(self) -> int:
        return self.ensemble_config.num_members

    @property
    def active_members(self) -> int:
        """How many members run in a forward: K, or the size of the chunk selected with ``members()``."""
        return len(range(self.num_members)[self._member_slice])

    @contextmanager
    def members(self, start: int, stop: int) -> Iterator[None]:
        """Run only members ``start .. stop-1`` (a member chunk): forwards return ``[stop - start, ...]``."""
        if not 0 <= start < stop <= self.num_members:
            raise ValueError(f"member chunk [{start}, {stop}) is not inside [0, {self.num_members})")
        layers = list(self.lora_layers().values())
        try:
            self._member_slice = slice(start, stop)
            for layer in layers:
                layer.member_slice = self._member_slice
            yield
        finally:
            self._member_slice = slice(None)
            for layer in layers:
                layer.member_slice = slice(None)

    def lora_layers(self) -> dict[str, EnsembleLoraLayer]:
        return {name: self.model.get_submodule(name) for name in self.module_names}

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.lora_layers().values() for p in (layer.lora_A, layer.lora_B)]

    def _repeat(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.repeat(self.active_members, *([1] * (tensor.dim() - 1)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """Member logits ``[K, B, T, V]`` for ``input_ids [B, T]`` (one batched pass over K*B rows).

        With ``labels [B, T]`` (-100 = not a target), returns the per-token target log-likelihoods
        ``[K, B, T]`` instead, computed without materialising the logits (``likelihoods.token_logliks``).
        Training goes through this method so that DDP/FSDP wrappers see the forward.
        """
        if labels is not None:
            features, head = self.output_features(input_ids, attention_mask)  # [K, B, T, H or V]
            return likelihoods.token_logliks(features, head, labels)
        B, T = input_ids.shape
        with self.shared_trunk(B) as shared:
            if not shared:
                input_ids, attention_mask = self._repeat(input_ids), self._repeat(attention_mask)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits.view(self.active_members, B, T, -1)  # [K, B, T, V]

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Delegates to the base model (called by the Trainer's ``--gradient_checkpointing``); ``kwargs`` are the
        base model's own (``every_n_layers``, ``offload`` in transformers >= 5.2x)."""
        if hasattr(self.model, "activation_checkpointing_enable"):
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)
        else:  # transformers before the rename
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)
        self.model.enable_input_require_grads()  # the frozen embeddings would otherwise cut the graph

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """The older name of ``activation_checkpointing_enable``."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states before the output head: ``[K, B, T, H]`` (``[1, B, T, H]`` when disabled)."""
        B, T = input_ids.shape
        K = self.output_members
        with self.shared_trunk(B) as shared:
            if K > 1 and not shared:
                input_ids, attention_mask = self._repeat(input_ids), self._repeat(attention_mask)
            out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state.view(K, B, T, -1)  # [K, B, T, H]

    def output_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                        ) -> tuple[torch.Tensor, nn.Linear | None]:
        """What the output head consumes: ``(hidden [K, B, T, H], head)``, or for a model whose logits are not
        ``head(hidden)`` (see ``likelihoods.output_head_is_plain``) ``(logits [K, B, T, V], None)``. K is 1 when
        disabled."""
        if self.plain_head:
            return self.hidden_states(input_ids, attention_mask), self.model.get_output_embeddings()
        if self.is_disabled:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[None], None
        return self(input_ids, attention_mask), None  # [K, B, T, V]

    @property
    def output_members(self) -> int:
        """The leading dimension of a forward's output: the members that run, or 1 while adapters are disabled."""
        return 1 if self.is_disabled else self.active_members

    @property
    def is_disabled(self) -> bool:
        return next(iter(self.lora_layers().values())).disabled

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the plain base model, on B rows instead of K*B; restores the adapters on exit."""
        layers = list(self.lora_layers().values())
        previous = [layer.disabled for layer in layers]
        try:
            for layer in layers:
                layer.disabled = True
            yield
        finally:
            for layer, state in zip(layers, previous, strict=True):
                layer.disabled = state

    def freeze_reference(self) -> None:
        """Keep a frozen copy of the current adapters (e.g. an SFT ensemble) as each member's DPO reference."""
        for layer in self.lora_layers().values():
            layer.register_buffer("ref_A", layer.lora_A.detach().clone(), persistent=False)
            layer.register_buffer("ref_B", layer.lora_B.detach().clone(), persistent=False)

    @contextmanager
    def reference_adapters(self) -> Iterator[None]:
        """Run every member with its frozen reference copy (see ``freeze_reference``); restored on exit."""
        layers = list(self.lora_layers().values())
        if not hasattr(layers[0], "ref_A"):
            raise RuntimeError("no reference adapters: call freeze_reference() first")
        try:
            for layer in layers:
                layer.use_reference = True
            yield
        finally:
            for layer in layers:
                layer.use_reference = False

    # Save / load / export live in renyi_lora.io; these are the conventional entry points.
    def save_pretrained(self, directory: str) -> None:
        io.save_ensemble(self, directory)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str, members: list[int] | None = None) -> LoraEnsemble:
        """Restore a saved ensemble onto ``model`` (optionally only the listed ``members``), validating shapes."""
        config, module_names, tensors, weights = io.read_ensemble(directory, model, members)
        ensemble = cls(model, config, module_names)
        io.copy_adapters(ensemble, tensors)
        ensemble.mixture_weights.copy_(weights)
        return ensemble


def sequence_logliks(ensemble: LoraEnsemble, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     labels: torch.Tensor, *, length_normalize: bool = False, chunk_size: int = 1024) -> torch.Tensor:
    """Per-member sequence log-likelihood of the completion tokens, ``[K, B]`` (mean over tokens if
    ``length_normalize``)."""
    features, head = ensemble.output_features(input_ids, attention_mask)  # [K, B, T, H or V]
    token = likelihoods.token_logliks(features, head, labels, chunk_size)  # [K, B, T]
    return likelihoods.sequence_loglik(token, labels, length_normalize, token.dtype)


def load_adapter_mixture(model: nn.Module, directories: list[str], members: list[int] | None = None) -> LoraEnsemble:
    """One ensemble from several adapter folders: saved ensembles (every member) and PEFT LoRA adapters (one
    member each), in the order given; ``members`` then picks among the concatenated members.

    Adapters trained elsewhere (e.g. K LoRAs trained independently with PEFT / TRL: a deep ensemble) are scored
    by the same code as ours. Members may differ in rank, scaling and adapted modules: each member's scaling is
    folded into its B, ranks are zero-padded to the largest, and a module a member does not adapt gets zeros
    there, so every member computes exactly its own ``W x + scaling * B A x``.

    Mixture weights: one saved ensemble keeps its saved ``mixture_weights`` (renormalised over ``members``); several
    folders get uniform weights over all their members, because weights learned inside one ensemble say nothing
    about how to weigh it against another (pass explicit weights to the scoring functions to choose).
    """
    if len(directories) == 1 and (Path(directories[0]) / io.CONFIG_NAME).is_file():
        return LoraEnsemble.from_pretrained(model, directories[0], members)  # exact, its own config
    found = io.read_mixture_members(model, directories, members)
    names = sorted({name for member in found for name in member})
    rank = max(a.shape[0] for member in found for a, _ in member.values())
    # lora_alpha = rank: scaling 1, each member's own scaling already sits in its B.
    config = EnsembleConfig(num_members=len(found), rank=rank, lora_alpha=float(rank), target_modules=names)
    ensemble = LoraEnsemble(model, config, names)
    with torch.no_grad():
        for name, layer in ensemble.lora_layers().items():
            layer.lora_A.zero_()
            layer.lora_B.zero_()
            for k, member in enumerate(found):
                if name in member:
                    a, b = member[name]
                    if a.shape[1] != layer.lora_A.shape[2] or b.shape[0] != layer.lora_B.shape[1]:
                        raise ValueError(f"member {k}: {name} has lora_A {list(a.shape)} / lora_B {list(b.shape)}, "
                                         f"which do not fit the base layer (Din {layer.lora_A.shape[2]}, Dout "
                                         f"{layer.lora_B.shape[1]})")
                    layer.lora_A[k, : a.shape[0]] = a
                    layer.lora_B[k, :, : b.shape[1]] = b
    return ensemble
