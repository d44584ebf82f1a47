"""Shared fixtures: a tiny character-level tokenizer and tiny random causal LMs, built in process; every test runs
torch on one thread (``one_thread``, autouse). Long behavioural runs are marked ``slow`` (``make test`` skips them;
``pytest -m slow`` runs them).

Where each module's tests live (module in ``renyi_lora/``: files in ``tests/``):

- objective: test_objective (vs mpmath, edge cases)
- uncertainty, plots: test_uncertainty (vs scikit-learn / torchmetrics), test_plots
- config, ensemble, likelihoods, io: test_ensemble (vs PEFT, the fused head, shared trunk), test_architectures (11
  families), test_eval_mixtures (mixtures of folders)
- records, sources, data, preference_data: test_data, test_bad_input (one-line errors), test_sources (datasets
  objects, folders, hub ids)
- prepare, train, outputs: test_trainer_api (TRL-shaped trainers, the README's snippets), test_trainer_defects,
  test_faults (resume, non-finite), test_member_chunks, test_compile, test_alpha_warmup, test_distributed (torchrun)
- preference: test_preference (vs TRL's DPO loss, behaviour)
- model_card: test_model_card (metadata parsed by huggingface_hub, upload selection)
- inference, scoring, token_uncertainty, generate: test_scoring, test_generate
- evaluate, ood, report: test_evaluate, test_eval_mixtures
- routing, sft_eval (posterior routing, the sequence mixture, eval on SFT data): test_routing, test_sft_eval
- curvature, refine, stability, critical: test_stability (closed forms), test_critical
- harness: test_harness (lm-evaluation-harness, members via hf+peft and the mixture)
- commands/, cli: test_cli, test_bad_input, test_trainer_api, test_eval_mixtures
- demo/: test_demo, test_analogy_data
- the method's behaviour: test_specialisation, test_group_split (slow seeds), test_alpha_warmup, test_preference
- the package's shape: test_structure (import circles, wings, sizes)
- training/upkeep (revival, learned weights, exact-zero gradients): test_upkeep
- benchmarks/quality: test_quality_data, test_quality_benchmark, test_quality_epochs (the epoch study), test_survey
  (the survey task), test_survey_run (its rows)
- the documentation: test_docs_links (relative links and anchors resolve, the README's length and paths)

``make_trainer`` (and its fixture ``tiny_trainer``) builds what the trainer tests train: records written and
tokenised, a tiny random Llama wrapped in K LoRA members, and a ``RenyiTrainer`` or ``RenyiDPOTrainer`` on them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from renyi_lora.config import (  # noqa: E402
    DPOConfig,
    EnsembleConfig,
    RenyiConfig,  # noqa: E402
)
from renyi_lora.data.preference import PreferenceCollator, load_preference_dataset  # noqa: E402
from renyi_lora.data.sft import SFTCollator, TokenizedDataset, load_sft_dataset  # noqa: E402
from renyi_lora.ensemble import LoraEnsemble  # noqa: E402
from renyi_lora.training.dpo import RenyiDPOTrainer  # noqa: E402
from renyi_lora.training.trainer import RenyiTrainer  # noqa: E402

SPECIAL_TOKENS = ["<pad>", "<eos>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level BPE (no merges) over printable ASCII, with ChatML special tokens and template."""
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token=None
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def merged_tokenizer() -> PreTrainedTokenizerFast:
    """Characters, plus " yes" and " no" merged into one token each (SmolLM2's layout: a word with its leading space
    is one token, a digit follows a space token)."""
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    merges = [(" ", "y"), (" y", "e"), (" ye", "s"), (" ", "n"), (" n", "o")]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + chars + [a + b for a, b in merges])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None))
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token=None)


def make_llama(vocab_size: int, seed: int = 0, hidden_size: int = 32, num_layers: int = 2) -> LlamaForCausalLM:
    """Tiny random Llama. initializer_range=0.1 lets a frozen head reach confident logits."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def tiny_llama(tokenizer) -> LlamaForCausalLM:
    return make_llama(len(tokenizer))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer saved as a Hugging Face folder, for the CLI's --model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_tokenizer()
    make_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# The settings every trainer test shares: CPU, no reporting, no checkpoints, no progress bar.
QUIET = {"use_cpu": True, "report_to": "none", "save_strategy": "no", "disable_tqdm": True}


@dataclass
class TinyRun:
    """A trainer built by ``make_trainer``, with the data it trains on."""

    trainer: RenyiTrainer
    dataset: TokenizedDataset
    collator: Callable[[list[dict]], dict]
    tokenizer: PreTrainedTokenizerFast
    path: Path
    max_length: int
    preference: bool

    @property
    def ensemble(self) -> LoraEnsemble:
        return self.trainer.ensemble

    def batch(self) -> dict:
        """Every training example in one collated batch (with its ``group`` row)."""
        return self.collator(self.dataset.examples)

    def load(self, records: list[dict], name: str) -> TokenizedDataset:
        """More records (e.g. held-out ones) written to ``path / name`` and tokenised like the training data."""
        return write_and_load(self.path / name, records, self.tokenizer, self.max_length, self.preference)


def write_and_load(path: Path, records: list[dict], tokenizer, max_length: int, preference: bool) -> TokenizedDataset:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return (load_preference_dataset if preference else load_sft_dataset)(path, tokenizer, max_length)


def make_trainer(path: Path, records: list[dict], *, preference: bool = False, max_length: int = 32,
                 model_seed: int = 0, hidden_size: int = 32, lora_b_std: float | None = None,
                 setup: Callable[[LoraEnsemble], dict | None] | None = None, pass_tokenizer: bool = False,
                 **settings) -> TinyRun:
    """A ``RenyiTrainer`` (``RenyiDPOTrainer`` with ``preference``) on a tiny random Llama, built the way the
    trainer tests build one, in this order: ``records`` written to ``path / "train.jsonl"`` and tokenised
    (``max_length``); the config, ``RenyiConfig`` / ``DPOConfig`` of ``QUIET`` plus ``settings`` (the members'
    shape too: ``num_members``, ``rank``, ``init_seed``, ... ; ``output_dir`` defaults to ``path / "out"``); the
    model ``make_llama(seed=model_seed, hidden_size=hidden_size)`` wrapped in ``LoraEnsemble(model,
    config.ensemble_config())``. ``lora_b_std``: every member's ``lora_B`` drawn as N(0, lora_b_std^2), each layer
    from a generator seeded 0, so that members differ from the start and the routing is not uniform. ``setup``
    runs on the ensemble before the trainer is built (tie parameters, hooks, a dtype); a dict it returns is passed
    to the trainer as keyword arguments (e.g. ``callbacks`` that hook the ensemble). ``pass_tokenizer`` gives the
    trainer the tokenizer as its ``processing_class`` (checkpoints then hold it)."""
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    dataset = write_and_load(path / "train.jsonl", records, tokenizer, max_length, preference)
    config = (DPOConfig if preference else RenyiConfig)(**{"output_dir": str(path / "out"), **QUIET, **settings})
    ensemble = LoraEnsemble(make_llama(len(tokenizer), seed=model_seed, hidden_size=hidden_size),
                            config.ensemble_config())
    if lora_b_std is not None:
        with torch.no_grad():
            for layer in ensemble.lora_layers().values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(0))
                                   * lora_b_std)
    extra = setup(ensemble) if setup is not None else None
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"make_trainer: setup returned a {type(extra).__name__}; return None or a dict of the "
                        "trainer's keyword arguments")
    collator = (PreferenceCollator if preference else SFTCollator)(tokenizer.pad_token_id)
    trainer = (RenyiDPOTrainer if preference else RenyiTrainer)(
        model=ensemble, args=config, group_names=dataset.group_names, train_dataset=dataset, data_collator=collator,
        processing_class=tokenizer if pass_tokenizer else None, **(extra or {}))
    return TinyRun(trainer, dataset, collator, tokenizer, path, max_length, preference)


@pytest.fixture
def tiny_trainer(tmp_path) -> Callable[..., TinyRun]:
    """``make_trainer`` in the test's ``tmp_path``: ``tiny_trainer(records, **options)``."""
    return lambda records, **options: make_trainer(tmp_path, records, **options)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every test runs torch on one thread: tiny matmuls on a shared 2-core machine are ~100x slower with two
    contending threads, and one thread makes the numbers independent of the machine's core count. Subprocesses
    (the CLI, torchrun) get ``OMP_NUM_THREADS=1`` from their tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def answer_records(seed: int, answers_per_example: int, num_prompts: int, repeats: int,
                   derived: dict | None = None) -> list[dict]:
    """Groups A and B answer the same questions with different random words; ``derived`` adds groups whose answers
    are a function of A's and B's (name -> f(answers) -> {question: word}). Each example holds several answers of
    one group, and every prompt (a set of questions) occurs once in each group, so the conflict is real."""
    rng = random.Random(seed)
    questions = [f"q{i}" for i in range(num_prompts)]

    def word() -> str:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(4))

    answers = {group: {q: word() for q in questions} for group in "AB"}
    for name, make in (derived or {}).items():
        answers[name] = make(answers)
    records = []
    for _ in range(repeats):
        for question in questions:
            asked = [question, *rng.sample([q for q in questions if q != question], answers_per_example - 1)]
            for group in answers:
                records.append({"prompt": ",".join(asked) + ":",
                                "completion": ",".join(answers[group][q] for q in asked) + ".", "group": group})
    return records


def conflict_scenario(root: Path, num_prompts: int = 3) -> tuple[Path, Path]:
    """Issue #21's scenario: ``root/base``, a tiny Llama (``make_llama``: hidden 32, two layers) saved with its
    tokenizer, and ``root/data.jsonl``, two groups answering the same ``num_prompts`` prompts with their own words (two
    answers per example, ``answer_records``: 2 * num_prompts examples, every prompt in both groups). Shared with
    ``benchmarks/bench_critical_alpha.py``."""
    tokenizer = make_tokenizer()
    make_llama(len(tokenizer)).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    records = answer_records(seed=0, answers_per_example=2, num_prompts=num_prompts, repeats=1)
    (root / "data.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return root / "base", root / "data.jsonl"


def load_example(name: str):
    """Import ``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def weighted_members(model, num_members: int = 3, pi=(0.5, 0.3, 0.2), std: float = 0.5, seed: int = 0):
    """An ensemble of distinct members (random B, ``std``) with mixture weights ``pi`` (as if learned; None =
    uniform), for tests of the mixture's scores against slow per-member oracles."""
    ensemble = LoraEnsemble(model, EnsembleConfig(num_members=num_members, init_seed=seed))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ensemble.lora_layers().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * std)
        if pi is not None:
            ensemble.mixture_weights.copy_(torch.tensor(pi))
    return ensemble


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def member_token_logprobs(ensemble, ids: list[int]) -> torch.Tensor:
    """Slow oracle: ``[K, T-1]`` log p_k(ids[t] | ids[:t]) for t >= 1, each member run alone, full log-softmax."""
    rows = []
    with torch.no_grad():
        for k in range(ensemble.num_members):
            with ensemble.members(k, k + 1):
                log_probs = torch.log_softmax(ensemble(torch.tensor([ids]))[0, 0].double(), dim=-1)  # [T, V]
            rows.append(log_probs[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0])
    return torch.stack(rows)

