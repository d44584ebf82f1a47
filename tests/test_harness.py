"""lm-evaluation-harness integration, offline on a tiny model: each exported member runs in lm-eval unchanged as a
PEFT adapter (``--model hf ... peft=``), and the registered ``renyi`` model scores the mixture of the members with
the same numbers as renyi-lora's own evaluation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("peft")
pytest.importorskip("datasets")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import renyi_lora.evaluation.harness as harness  # noqa: E402  (registers the "renyi" model)
from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble  # noqa: E402
from renyi_lora.evaluation.multiple_choice import choice_log_probs, evaluate_multiple_choice  # noqa: E402
from renyi_lora.evaluation.token_uncertainty import completion_scores  # noqa: E402
from renyi_lora.io import export_all_peft  # noqa: E402
from renyi_lora.models import load_model_and_tokenizer  # noqa: E402

try:
    from renyi_lora.evaluation.multiple_choice import load_multiple_choice
except ImportError:  # older layout
    from renyi_lora.data.sft import load_multiple_choice
try:
    from renyi_lora.evaluation.inference import pad_right
except ImportError:  # older layout
    from renyi_lora.evaluation.token_uncertainty import pad_right

# Choices start with a space and the task's target_delimiter is "", so lm-eval scores exactly prompt + choice, as
# renyi-lora does. Choices differ in length (multi-token, character-level tokenizer) and in number.
ITEMS = [
    {"prompt": "Q: sky colour?\nA:", "choices": [" blue", " red", " green"], "answer": 0},
    {"prompt": "Q: 2 + 2 =", "choices": [" 4", " 5", " 22", " four"], "answer": 0},
    {"prompt": "Q: capital of France?\nA:", "choices": [" Rome", " Paris"], "answer": 1},
    {"prompt": "Q: opposite of hot?\nA:", "choices": [" warm", " cold", " wet"], "answer": 1},
    {"prompt": "Q: a cat says\nA:", "choices": [" woof", " moo", " meow"], "answer": 2},
    {"prompt": "Q: first letter?\nA:", "choices": [" z", " a"], "answer": 1},
]
TASK = "renyi_toy_mc"
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def setup(model_dir, tmp_path_factory):
    """A saved 2-member ensemble on the tiny Llama (random B: the members differ), its PEFT export as
    ``renyi-lora sft`` lays it out (``<out>/peft/member_k``), and a local lm-eval task over ``ITEMS``."""
    root = tmp_path_factory.mktemp("harness")
    model, tokenizer = load_model_and_tokenizer(str(model_dir), torch_dtype=torch.float32)
    ensemble = LoraEnsemble(model.eval(), EnsembleConfig(num_members=2, rank=4, init_lora_b_std=0.3, init_seed=1))
    out = root / "out"
    ensemble.save_pretrained(str(out))
    export_all_peft(ensemble, out / "peft")
    data = root / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))
    yield {"model_dir": model_dir, "out": out, "data": data, "tasks": tasks, "ensemble": ensemble,
           "tokenizer": tokenizer, "task_manager": TaskManager(include_path=str(tasks))}


def run_lm_eval(setup, model: str, model_args: str) -> tuple[float, list[list[float]], object]:
    """``(acc, per-item choice log-likelihoods in doc order, the lm object)`` of one ``simple_evaluate`` run."""
    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], batch_size=8, device="cpu",
                                      task_manager=setup["task_manager"], log_samples=True)
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    logliks = [[float(resp[0]) for resp in sample["filtered_resps"]] for sample in samples]
    return results["results"][TASK]["acc,none"], logliks, results


def normalised(logliks: list[float]) -> torch.Tensor:
    return torch.log_softmax(torch.tensor(logliks, dtype=torch.float64), dim=0)


def test_members_as_peft_and_the_mixture_in_lm_eval(setup):
    items = load_multiple_choice(setup["data"])
    ensemble, tokenizer = setup["ensemble"], setup["tokenizer"]
    ours = choice_log_probs(ensemble, tokenizer, items)  # [K, N, C] each member's distribution over the choices
    report = evaluate_multiple_choice(ensemble, tokenizer, items)

    # (i) Each exported member runs in lm-eval unchanged, as a PEFT adapter on the hf model.
    members, member_accs = [], []
    for k in range(2):
        acc, logliks, _ = run_lm_eval(setup, "hf", f"pretrained={setup['model_dir']},peft={setup['out']}/peft/"
                                                   f"member_{k},dtype=float32")
        for n, item in enumerate(items):
            torch.testing.assert_close(normalised(logliks[n]), ours[k, n, : len(item.choices)], atol=1e-4, rtol=0)
        assert acc == pytest.approx(report["members"][k]["accuracy"])
        members.append(logliks)
        member_accs.append(acc)

    differ = max(abs(a - b) for m0, m1 in zip(*members, strict=True) for a, b in zip(m0, m1, strict=True))
    assert differ > 1e-2  # the PEFT adapters were applied: the members disagree
    gap = max((normalised(members[0][n]) - ours[0, n, : len(item.choices)]).abs().max().item()
              for n, item in enumerate(items))
    print(f"\nmembers' largest loglik difference {differ:.3f}; lm-eval hf+peft vs renyi-lora member 0: {gap:.1e}")

    # (ii) The renyi model: the mixture log sum_k pi_k p_k(choice | prompt) of the same members.
    acc, mixture, results = run_lm_eval(setup, "renyi", f"pretrained={setup['model_dir']},adapters={setup['out']}")
    for n in range(len(items)):
        expected = torch.logsumexp(torch.tensor([members[0][n], members[1][n]], dtype=torch.float64), 0) - math.log(2)
        torch.testing.assert_close(torch.tensor(mixture[n], dtype=torch.float64), expected, atol=1e-4, rtol=0)
    # lm-eval picks argmax_c sum_k pi_k p_k(c | x); renyi-lora eval mixes each member's distribution over the
    # choices (normalised per member). Different rules in general; on these items they pick the same answers.
    mixed_predictions = [int(torch.tensor(m).argmax()) for m in mixture]
    assert mixed_predictions == [item["prediction"] for item in report["items"]]
    assert acc == pytest.approx(report["mixture"]["accuracy"])
    print(f"\nacc: lm-eval hf+peft member 0 {member_accs[0]}, member 1 {member_accs[1]}; lm-eval renyi mixture {acc}; "
          f"renyi-lora eval mixture {report['mixture']['accuracy']}, member 0 {report['members'][0]['accuracy']}")

    # The same members from their PEFT folders ('|'-separated) give the same mixture.
    acc_peft, mixture_peft, _ = run_lm_eval(setup, "renyi", f"pretrained={setup['model_dir']},adapters="
                                                            f"{setup['out']}/peft/member_0|{setup['out']}/peft/member_1")
    assert acc_peft == acc
    for a, b in zip(mixture, mixture_peft, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)


def test_choice_mi_records_match_renyi_lora_eval(setup, tmp_path):
    """``RenyiLM.records`` carry the choice-level MI of each question: renyi-lora eval's ``epistemic``."""
    items = load_multiple_choice(setup["data"])
    report = evaluate_multiple_choice(setup["ensemble"], setup["tokenizer"], items)
    log = tmp_path / "mi.jsonl"
    lm = harness.RenyiLM(pretrained=str(setup["model_dir"]), adapters=str(setup["out"]), mi_log=str(log))
    requests = [Instance("loglikelihood", {}, (item.prompt, choice), c, (TASK, n, 1))
                for n, item in enumerate(items) for c, choice in enumerate(item.choices)]
    lm.loglikelihood(requests, disable_tqdm=True)
    assert [json.loads(line) for line in log.read_text().splitlines()] == lm.records
    for record in lm.records:
        expected = report["items"][record["doc_id"]]
        assert record["choice_mi"] == pytest.approx(expected["epistemic"], abs=1e-5)
        assert record["choice_entropy"] == pytest.approx(expected["total"], abs=1e-5)
        assert len(record["member_logliks"]) == 2 and record["mean_token_mi"] >= 0


def brute_force_greedy(ensemble, prompt: list[int], continuation: list[int], log_pi: torch.Tensor) -> bool:
    """Every continuation token is the argmax of sum_k w_k p_k(. | prompt, earlier tokens), w_k ∝ pi_k p_k(earlier)."""
    before = log_pi.clone()
    for t, token in enumerate(continuation):
        logits = ensemble(torch.tensor([prompt + continuation[:t]]))[:, 0, -1]  # [K, V]
        log_probs = torch.log_softmax(logits.double(), dim=-1)
        weights = torch.log_softmax(before, dim=0)
        if int(torch.logsumexp(log_probs + weights[:, None], dim=0).argmax()) != token:
            return False
        before = before + log_probs[:, token]
    return True


def test_sequence_scores_match_the_library_and_brute_force(setup):
    ensemble, tokenizer = setup["ensemble"], setup["tokenizer"]
    log_pi = torch.tensor([0.3, 0.7], dtype=torch.float64).log()
    prompts = [tokenizer.encode(text) for text in ("Q: sky", "Q: 2 + 2 =", "ab")]
    # A continuation the mixture decodes greedily (posterior weights), and the same with its last token changed.
    greedy = []
    for prompt in prompts:
        before, tokens = log_pi.clone(), []
        for _ in range(4):
            log_probs = torch.log_softmax(ensemble(torch.tensor([prompt + tokens]))[:, 0, -1].double(), dim=-1)
            token = int(torch.logsumexp(log_probs + torch.log_softmax(before, 0)[:, None], dim=0).argmax())
            before, tokens = before + log_probs[:, token], tokens + [token]
        greedy.append(tokens)
    rows = [(p, c) for p, c in zip(prompts, greedy, strict=True)]
    rows += [(p, c[:-1] + [(c[-1] + 1) % len(tokenizer)]) for p, c in zip(prompts, greedy, strict=True)]
    rows += [(prompts[0], tokenizer.encode(" a longer continuation, over more than one chunk"))]
    input_ids, attention_mask, labels = pad_right([p for p, _ in rows], [c for _, c in rows], 0)
    scores = harness.sequence_scores(ensemble, input_ids, attention_mask, labels, log_weights=log_pi, chunk_size=5)
    library = completion_scores(ensemble, input_ids, attention_mask, labels, log_weights=log_pi)
    torch.testing.assert_close(scores["member_loglik"], library.member_loglik().double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(scores["mean_mi"], library.mean_mi().double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(scores["mixture_loglik"], torch.logsumexp(scores["member_loglik"] + log_pi[:, None], 0))
    expected = [brute_force_greedy(ensemble, p, c, log_pi) for p, c in rows]
    assert scores["is_greedy"].tolist() == expected
    assert expected[:3] == [True, True, True] and expected[3:6] == [False, False, False]


def test_loglikelihood_rolling_is_the_sequence_mixture(setup):
    lm = harness.RenyiLM(pretrained=str(setup["model_dir"]), adapters=str(setup["out"]), weights="1|3")
    text = "the quick brown fox jumps over the lazy dog"
    [whole] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ids = lm.tok_encode(text)
    member = harness.sequence_scores(lm.ensemble, *pad_right([[lm.prefix_token_id]], [ids], 0),
                                     log_weights=lm.log_weights)["member_loglik"][:, 0]
    assert whole == pytest.approx(torch.logsumexp(member + torch.tensor([0.25, 0.75]).log().double(), 0).item())
    lm._max_length = 12  # several windows: each member's windows are summed before mixing
    [windowed] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    assert math.isfinite(windowed) and windowed != pytest.approx(whole)
    with pytest.raises(NotImplementedError, match="renyi-lora generate"):
        lm.generate_until([Instance("generate_until", {}, ("x", {"until": ["\n"]}), 0)])


def test_python_m_entry_point_runs_lm_eval_with_the_renyi_model(setup, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "renyi_lora.evaluation.harness", "--model", "renyi", "--model_args",
         f"pretrained={setup['model_dir']},adapters={setup['out']}", "--tasks", TASK, "--include_path",
         str(setup["tasks"]), "--device", "cpu", "--batch_size", "8", "--output_path", str(tmp_path / "results")],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert TASK in result.stdout and "acc" in result.stdout
