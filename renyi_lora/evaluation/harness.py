"""lm-evaluation-harness model type ``renyi``: any lm-eval task scores the *mixture* of an ensemble.

Importing this module registers the model with ``lm_eval.api.registry.register_model("renyi")``. From the shell::

    python -m renyi_lora.evaluation.harness --model renyi \\
        --model_args pretrained=BASE,adapters=OUT \\
        --tasks hellaswag --batch_size 16

``python -m renyi_lora.evaluation.harness ARGS`` is lm-eval's own command line (``lm_eval ARGS``) with this module
imported first. model_args:

- ``pretrained``: the base model, as for ``renyi-lora`` (``smollm2-135m``, a local folder or a hub id).
- ``adapters``: one saved ensemble folder (every member), or several folders separated by ``|``: saved ensembles
  and PEFT LoRA folders (one member each, e.g. ``OUT/peft/member_0|OUT/peft/member_1``), as ``renyi-lora eval
  --adapters`` (``renyi_lora.io.load_adapter_mixture``).
- ``members`` (optional, e.g. ``0|2``): keep only these of the concatenated members.
- ``weights`` (optional, e.g. ``1|3``): mixture weights ``pi`` (normalised); if omitted, the ensemble's saved mixture
  weights (``LoraEnsemble.mixture_weights``: uniform unless learned; uniform over the members of several folders).
- ``batch_size`` (rows per forward, default 16), ``device`` (``auto``, ``cpu``, ``cuda``...), ``dtype``
  (``float32`` default), ``max_length``, ``add_bos_token``, ``trust_remote_code``, ``mi_log`` (a JSONL path, below).

What the requests return, for the sequence mixture ``p(y | x) = sum_k pi_k p_k(y | x)``:

- ``loglikelihood``: ``log sum_k pi_k p_k(continuation | context)`` (a logsumexp over members of the member's
  sequence log-likelihood plus ``log pi_k``) and ``is_greedy``: every continuation token is the argmax of the
  mixture's next-token distribution given the tokens before it. That conditional is
  ``sum_k w_k p_k(y_t | x, y_<t)`` with ``w_k ∝ pi_k p_k(y_<t | x)``: the weights follow each member's fit to
  the continuation so far (Bayes' rule), which is what makes the product of these conditionals the sequence mixture.
- ``loglikelihood_rolling``: the same sequence mixture of the whole text: each member's log-likelihood summed over
  lm-eval's rolling windows, then mixed (mixing each window separately would be a different model).
- ``generate_until``: not implemented (raises), see ``RenyiLM.generate_until``.

Tokenisation is lm-eval's (``TemplateLM``: the continuation's tokens are those of ``context + continuation``
after the context's, trailing spaces of the context move to the continuation), with the tokenizer's default
special tokens as lm-eval's ``hf`` model, so a one-member ``renyi`` model and ``--model hf ... peft=`` score the
same tokens. Member log-likelihoods come from one forward of the K members on right-padded rows
(the output features of the ensemble and its head, as ``token_uncertainty.completion_scores``).

Mutual information. After each ``loglikelihood`` call, ``RenyiLM.records`` holds one dict per request (task,
doc_id, member log-likelihoods, mixture log-likelihood, the mean token MI along the continuation with weights pi,
the weighted variance of the member log-likelihoods) and, when a document has several requests with one context
(a multiple-choice question), ``choice_mi`` / ``choice_entropy``: the MI and total entropy of the mixture over
that document's choices, each member's choice distribution being the softmax of its choice log-likelihoods (the
``epistemic`` / ``total`` of ``renyi-lora eval``). ``mi_log=PATH`` appends the records to a JSONL file.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from renyi_lora.evaluation.inference import load_for_inference, pad_right
from renyi_lora.evaluation.token_uncertainty import decompose_rows, prior_log_weights
from renyi_lora.likelihoods import IGNORE_INDEX
from renyi_lora.models import resolve_device
from renyi_lora.uncertainty import decompose_uncertainty, mixture_log_probs

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_LENGTH = 2048
SEPARATOR = "|"


def _split(value: Any, convert=str) -> list | None:
    """A model_arg list: ``None``, a list, one value, or values separated by ``|`` (lm-eval splits model_args on
    commas, so lists use another separator)."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)):
        return [convert(v) for v in value]
    return [convert(v.strip()) for v in str(value).split(SEPARATOR) if v.strip()]


def _bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


@torch.no_grad()
def sequence_scores(ensemble, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                    *, log_weights: torch.Tensor, chunk_size: int = 256) -> dict[str, torch.Tensor]:
    """Member and mixture scores of the target tokens of ``labels`` (right-padded rows, -100 = not a target).

    Returns ``member_loglik [K, B]`` (float64), ``mixture_loglik [B]`` (``logsumexp_k(member + log pi_k)``),
    ``is_greedy [B]`` (every target is the argmax of the sequence mixture's conditional next-token distribution,
    weights ``∝ pi_k p_k(targets before it)``), ``mean_mi [B]`` (mean over the targets of the MI of the
    ``pi``-weighted next-token mixture, as ``token_uncertainty.completion_scores``).
    """
    B = input_ids.shape[0]
    log_weights = log_weights.to(device=input_ids.device, dtype=torch.float64)  # [K]
    mask = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]: position t-1 predicts labels[t]
    targets = labels[:, 1:][mask]  # [N], row-major: each row's targets contiguous and in order
    rows = torch.arange(B, device=input_ids.device)[:, None].expand_as(mask)[mask]  # [N]
    # The last position predicts nothing: the model runs on T-1 tokens (rows of max_length + 1 fit, as in lm-eval).
    features, head = ensemble.output_features(input_ids[:, :-1], attention_mask[:, :-1])  # [K, B, T-1, H or V]
    K, features = features.shape[0], features[:, mask]  # [K, N, H or V]
    member_loglik = torch.zeros(K, B, dtype=torch.float64, device=input_ids.device)
    mi_sum = torch.zeros(B, dtype=torch.float64, device=input_ids.device)
    misses = torch.zeros(B, dtype=torch.long, device=input_ids.device)
    for start in range(0, targets.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        logits = features[:, chunk] if head is None else head(features[:, chunk])
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # [K, n, V]
        n, chunk_rows = log_probs.shape[1], rows[chunk]
        member = log_probs.gather(-1, targets[chunk].expand(K, -1)[..., None]).squeeze(-1).double()  # [K, n]
        # Member log-likelihood of each row's targets before each token: the running total of earlier chunks plus
        # the exclusive cumulative sum within this chunk, restarted where a new row begins.
        inclusive = member.cumsum(-1)
        starts = torch.ones(n, dtype=torch.bool, device=member.device)
        starts[1:] = chunk_rows[1:] != chunk_rows[:-1]
        first = torch.where(starts, torch.arange(n, device=member.device), 0).cummax(0).values  # [n]
        before = member_loglik[:, chunk_rows] + inclusive - member - (inclusive - member)[:, first]  # [K, n]
        posterior = torch.log_softmax(log_weights[:, None] + before, dim=0)  # [K, n]
        mixture = mixture_log_probs(log_probs.double(), posterior)  # [n, V]
        misses.index_add_(0, chunk_rows, (mixture.argmax(-1) != targets[chunk]).long())
        mi = decompose_rows(log_probs, log_weights[:, None].expand(K, n)).epistemic  # [n]
        mi_sum.index_add_(0, chunk_rows, mi.double())
        member_loglik.index_add_(1, chunk_rows, member)
    counts = mask.sum(-1).clamp(min=1)
    return {"member_loglik": member_loglik, "mixture_loglik": mixture_log_probs(member_loglik, log_weights),
            "is_greedy": misses == 0, "mean_mi": mi_sum / counts}


class RenyiLM(TemplateLM):
    """The mixture of a renyi-lora ensemble (or of PEFT LoRA adapters) as an lm-eval model; see the module doc."""

    def __init__(self, pretrained: str, adapters: str | Sequence[str] | None = None, members: Any = None,
                 weights: Any = None, batch_size: int | str = DEFAULT_BATCH_SIZE, max_batch_size: int | None = None,
                 device: str | None = "auto", dtype: str = "float32", max_length: int | None = None,
                 add_bos_token: bool | None = None, trust_remote_code: bool = False, mi_log: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            logger.warning("renyi: ignoring unknown model_args %s", sorted(kwargs))
        directories = _split(adapters)
        if not directories:
            raise ValueError("renyi: model_args needs adapters=<saved ensemble folder> or several adapter folders "
                             f"separated by '{SEPARATOR}' (saved ensembles, PEFT LoRA folders such as "
                             "<output_dir>/peft/member_0)")
        for directory in directories:
            if not Path(directory).is_dir():
                raise FileNotFoundError(f"renyi: adapters folder {directory} not found")
        device = "auto" if device in (None, "") else str(device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            logger.warning("renyi: device %s requested but CUDA is not available; using the CPU", device)
            device = "cpu"
        self._device = resolve_device(device)
        self.ensemble, self.tokenizer = load_for_inference(str(pretrained), directories, _split(members, int),
                                                           _bool(trust_remote_code), device=device,
                                                           dtype=getattr(torch, str(dtype)))
        self.ensemble.eval()
        self.log_weights = prior_log_weights(self.ensemble, _split(weights, float))
        if isinstance(batch_size, str) and not batch_size.strip().isdigit():
            logger.warning("renyi: batch_size=%s is not supported; using %d rows per forward", batch_size,
                           DEFAULT_BATCH_SIZE)
            batch_size = DEFAULT_BATCH_SIZE
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"renyi: batch_size must be >= 1; got {batch_size}")
        self._max_length = int(max_length) if max_length else None
        self.add_bos_token = None if add_bos_token is None else _bool(add_bos_token)
        self.pretrained, self.adapters = str(pretrained), directories
        self.mi_log = Path(mi_log) if mi_log else None
        self.records: list[dict] = []

    # --- lm-eval plumbing ------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        from lm_eval.models.utils import resolve_max_length

        return resolve_max_length(self.ensemble.model.config, self.tokenizer, default=DEFAULT_MAX_LENGTH)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        return chat_template if isinstance(chat_template, str) else self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """As lm-eval's ``hf`` model: the tokenizer's default special tokens (``add_bos_token`` overrides), none
        when the text already starts with the BOS text."""
        if add_special_tokens is None and self.add_bos_token is not None:
            add_special_tokens = self.add_bos_token
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            add_special_tokens = False
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    # --- scoring --------------------------------------------------------------------------------------------------
    def _score_token_rows(self, rows: list[tuple[list[int], list[int]]], desc: str,
                          disable_tqdm: bool = False) -> list[dict]:
        """``sequence_scores`` of ``(context_ids, continuation_ids)`` rows, batched longest first, in input order.
        As lm-eval's ``hf`` model, the model sees at most ``max_length`` tokens (the last ``max_length + 1`` of
        context + continuation, less the last): a longer context loses tokens from the left."""
        limit = self.max_length
        fitted = []
        for context, continuation in rows:
            if len(continuation) > limit:
                raise ValueError(f"renyi: a continuation of {len(continuation)} tokens does not fit max_length "
                                 f"{limit}")
            fitted.append((context[max(0, len(context) + len(continuation) - limit - 1):], continuation))
        order = sorted(range(len(fitted)), key=lambda i: -sum(map(len, fitted[i])))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        results: list[dict | None] = [None] * len(fitted)
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, disable=disable_tqdm or self.rank != 0):
            batch = order[start:start + self.batch_size]
            scores = sequence_scores(self.ensemble, *pad_right([fitted[i][0] for i in batch],
                                                               [fitted[i][1] for i in batch], pad, self._device),
                                     log_weights=self.log_weights)
            scores = {name: value.cpu() for name, value in scores.items()}
            for b, i in enumerate(batch):
                results[i] = {"member_loglik": scores["member_loglik"][:, b], "mixture_loglik":
                              scores["mixture_loglik"][b].item(), "is_greedy": bool(scores["is_greedy"][b]),
                              "mean_mi": scores["mean_mi"][b].item()}
        return results  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        scored = self._score_token_rows([(context, continuation) for _, context, continuation in requests],
                                        "renyi mixture loglikelihood", disable_tqdm)
        for (pair, _, _), result in zip(requests, scored, strict=True):
            self.cache_hook.add_partial("loglikelihood", pair, (result["mixture_loglik"], result["is_greedy"]))
        self._last_scores = scored
        return [(result["mixture_loglik"], result["is_greedy"]) for result in scored]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        answers = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        self._record(requests, self._last_scores)
        return answers

    def _record(self, requests, scored: list[dict]) -> None:
        """Per-request records, with the choice-level MI of documents that have several continuations."""
        weights = self.log_weights.exp()
        records = []
        for request, result in zip(requests, scored, strict=True):
            member = result["member_loglik"]
            mean = (weights * member).sum()
            context, continuation = request.args
            records.append({"task": request.task_name, "doc_id": request.doc_id, "continuation": continuation,
                            "member_logliks": member.tolist(), "mixture_loglik": result["mixture_loglik"],
                            "is_greedy": result["is_greedy"], "mean_token_mi": result["mean_mi"],
                            "loglik_variance": (weights * (member - mean) ** 2).sum().item(), "_context": context})
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, record in enumerate(records):
            if record["doc_id"] is not None:
                groups[(record["task"], record["doc_id"], record["_context"])].append(i)
        for index in groups.values():
            if len(index) < 2:
                continue
            member = torch.stack([scored[i]["member_loglik"] for i in index], dim=-1)  # [K, C]
            uncertainty = decompose_uncertainty(torch.log_softmax(member, dim=-1), self.log_weights)
            for i in index:
                records[i].update(choice_mi=uncertainty.epistemic.item(), choice_entropy=uncertainty.total.item())
        for record in records:
            del record["_context"]
        self.records = records
        if self.mi_log is not None and self.rank == 0:
            self.mi_log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.mi_log, "a") as handle:
                handle.writelines(json.dumps(record) + "\n" for record in records)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The sequence mixture of each whole text: member log-likelihoods summed over lm-eval's rolling windows
        (context 1, as the ``hf`` model), then ``logsumexp_k(member + log pi_k)``."""
        windows, owner = [], []
        for n, (string,) in enumerate(request.args for request in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((context, continuation))
                owner.append(n)
        scored = self._score_token_rows(windows, "renyi mixture loglikelihood_rolling", disable_tqdm)
        member = torch.zeros(self.ensemble.num_members, len(requests), dtype=torch.float64)
        for n, result in zip(owner, scored, strict=True):
            member[:, n] += result["member_loglik"]
        totals = mixture_log_probs(member, self.log_weights).tolist()
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError(
            "renyi: generate_until is not supported; lm-eval generative tasks need greedy decoding of the sequence "
            "mixture, whose next-token weights change with every token. Score generative tasks per member with "
            "--model hf --model_args pretrained=BASE,peft=OUT/peft/member_k, and generate from the sequence mixture "
            "(the predictive these scores use) with per-token mutual information with `renyi-lora generate --model "
            "BASE --adapters OUT --mode mixture`.")


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line with the ``renyi`` model registered: ``python -m renyi_lora.evaluation.harness ARGS``."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    # Run as a script this file is the module ``__main__``; registering its class as well would clash with the
    # importable ``renyi_lora.evaluation.harness``'s, so the importable module registers the model and runs the CLI.
    from renyi_lora.evaluation.harness import main as _main

    _main()
else:
    # lm-eval fills its model registry (hf, vllm, ...) from lm_eval.models only while the registry is empty: load
    # those placeholders first, or registering "renyi" alone would hide every built-in model type.
    import lm_eval.models  # noqa: F401

    register_model("renyi")(RenyiLM)
