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
- benchmarks/quality: test_quality_data, test_quality_benchmark, test_quality_epochs (the epoch study), test_survey
  (the survey task)
"""

from __future__ import annotations

import importlib.util
import os
import random
import string
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

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


def load_example(name: str):
    """Import ``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
