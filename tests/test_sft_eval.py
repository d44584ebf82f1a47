"""``renyi-lora eval`` on SFT data: member and mixture log-likelihoods, responsibilities, per-group tables and NMI
against hand computations with non-uniform mixture weights; routing on the prompt (SFT and multiple choice); the
command end to end and its errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import ids_of, weighted_members
from conftest import member_token_logprobs as oracle_logprobs
from sklearn.metrics import normalized_mutual_info_score

from renyi_lora.cli import main
from renyi_lora.data.sft import load_sft_dataset
from renyi_lora.ensemble import LoraEnsemble
from renyi_lora.evaluation.inference import encode_prompt
from renyi_lora.evaluation.multiple_choice import MultipleChoiceItem, evaluate_multiple_choice
from renyi_lora.evaluation.routing import prompt_log_weights
from renyi_lora.evaluation.sequences import evaluate_sft, sft_metrics
from renyi_lora.likelihoods import IGNORE_INDEX
from renyi_lora.uncertainty import normalized_mutual_information

PI = [0.5, 0.3, 0.2]
EOS = 1
RECORDS = [{"prompt": "q1,q2:", "completion": " abc,def.", "group": "A"},
           {"prompt": "q1,q2:", "completion": " xyz,uvw.", "group": "B"},
           {"prompt": "q3:", "completion": " hij", "group": "A"},
           {"prompt": "q3:", "completion": " klm", "group": "B"},
           {"prompt": "what is it", "completion": " no", "group": "C"},
           {"prompt": "a", "completion": " a long answer, longer than the others", "group": "A"}]

pytestmark = pytest.mark.usefixtures("one_thread")


def make_ensemble(model, pi=PI, std: float = 0.5, seed: int = 0) -> LoraEnsemble:
    return weighted_members(model, 3, pi, std, seed)


def member_token_logprobs(ensemble, ids: list[int]) -> torch.Tensor:
    """``[K, T]``: conftest's oracle with 0 at t = 0."""
    shifted = oracle_logprobs(ensemble, ids)  # [K, T-1]
    return torch.cat([torch.zeros(len(shifted), 1, dtype=shifted.dtype), shifted], dim=1)


def hand_scores(ensemble, tokenizer, records) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(completion loglik [K, N], prompt loglik [K, N], target tokens [N])``: plain prompt ids, then the
    completion's ids and EOS as targets (the training tokenisation, computed here by hand)."""
    completion, prompt, tokens = [], [], []
    for record in records:
        prompt_ids = ids_of(tokenizer, record["prompt"])
        target_ids = ids_of(tokenizer, record["completion"]) + [EOS]
        token = member_token_logprobs(ensemble, prompt_ids + target_ids)  # [K, T]
        completion.append(token[:, len(prompt_ids):].sum(-1))
        prompt.append(token[:, 1:len(prompt_ids)].sum(-1))
        tokens.append(len(target_ids))
    return torch.stack(completion, 1), torch.stack(prompt, 1), torch.tensor(tokens, dtype=torch.float64)


def test_sft_eval_equals_hand_computed_mixture(tokenizer, tiny_llama):
    ensemble = make_ensemble(tiny_llama)
    results = evaluate_sft(ensemble, tokenizer, RECORDS, batch_size=4)  # two batches, padded, longest first
    json.dumps(results, allow_nan=False)
    loglik, _, tokens = hand_scores(ensemble, tokenizer, RECORDS)
    log_pi = torch.tensor(PI, dtype=torch.float64).log()
    mixture = torch.logsumexp(loglik + log_pi[:, None], dim=0)  # [N]
    routing = torch.softmax(loglik + log_pi[:, None], dim=0)  # [K, N]
    assert results["weights"] == pytest.approx(PI) and results["num_examples"] == 6
    assert results["num_tokens"] == tokens.sum().item()
    for n, example in enumerate(results["examples"]):
        assert example["line"] == n + 1 and example["group"] == RECORDS[n]["group"]
        assert example["prompt"] == RECORDS[n]["prompt"] and example["num_tokens"] == tokens[n]
        assert example["member_logliks"] == pytest.approx(loglik[:, n].tolist(), abs=2e-4)
        assert example["mixture_loglik"] == pytest.approx(mixture[n].item(), abs=2e-4)
        assert example["responsibility"] == pytest.approx(routing[:, n].tolist(), abs=1e-4)
        assert example["weights"] == pytest.approx(PI)
    assert results["mixture"]["nll"] == pytest.approx(-mixture.mean().item(), abs=2e-4)
    assert results["mixture"]["nll_per_token"] == pytest.approx(-mixture.sum().item() / tokens.sum().item(), abs=1e-4)
    for k, member in enumerate(results["members"]):
        assert member["nll"] == pytest.approx(-loglik[k].mean().item(), abs=2e-4)
        assert member["nll_per_token"] == pytest.approx(-loglik[k].sum().item() / tokens.sum().item(), abs=1e-4)
    groups = [r["group"] for r in RECORDS]
    assert results["routing_matrix"]["groups"] == ["A", "B", "C"] == list(results["groups"])
    for g, name in enumerate(["A", "B", "C"]):
        index = [n for n, group in enumerate(groups) if group == name]
        block = results["groups"][name]
        assert block["num_examples"] == len(index)
        assert block["mixture"]["nll"] == pytest.approx(-mixture[index].mean().item(), abs=2e-4)
        assert [m["nll"] for m in block["members"]] == pytest.approx((-loglik[:, index].mean(1)).tolist(), abs=2e-4)
        assert results["routing_matrix"]["matrix"][g] == pytest.approx(routing[:, index].mean(1).tolist(), abs=1e-4)
    owners = routing.argmax(0).tolist()
    assert len(set(owners)) > 1  # a case where the NMI is not trivially 0 or 1
    assert results["nmi"] == pytest.approx(normalized_mutual_info_score(groups, owners), abs=1e-12)
    # --weights overrides the saved weights.
    uniform = evaluate_sft(ensemble, tokenizer, RECORDS, weights=[1, 1, 1])
    assert uniform["mixture"]["nll"] == pytest.approx(-(torch.logsumexp(loglik, 0) - math.log(3)).mean().item(),
                                                      abs=2e-4)


def test_sft_eval_route_on_prompt(tokenizer, tiny_llama):
    ensemble = make_ensemble(tiny_llama)
    results = evaluate_sft(ensemble, tokenizer, RECORDS, route_on_prompt=True, batch_size=3)
    loglik, prompt, _ = hand_scores(ensemble, tokenizer, RECORDS)
    log_w = torch.log_softmax(torch.tensor(PI, dtype=torch.float64).log()[:, None] + prompt, dim=0)  # [K, N]
    # the same rule as generate --route_on_prompt (one function)
    same = prompt_log_weights(ensemble, [ids_of(tokenizer, r["prompt"]) for r in RECORDS])
    torch.testing.assert_close(same, log_w, atol=1e-5, rtol=1e-5)
    for n, example in enumerate(results["examples"]):
        assert example["weights"] == pytest.approx(log_w[:, n].exp().tolist(), abs=1e-5)
        assert example["mixture_loglik"] == pytest.approx(torch.logsumexp(log_w[:, n] + loglik[:, n], 0).item(),
                                                          abs=2e-4)
        expected = torch.softmax(log_w[:, n] + loglik[:, n], 0)  # ∝ pi_k p_k(prompt) p_k(completion | prompt)
        assert example["responsibility"] == pytest.approx(expected.tolist(), abs=1e-4)
    assert results["route_on_prompt"] and results["weights"] == pytest.approx(PI)
    # A one-token prompt ("a") carries no evidence: its weights are the prior.
    assert results["examples"][5]["weights"] == pytest.approx(PI)


@pytest.mark.parametrize("kind", ["messages", "text"])
def test_sft_eval_reads_messages_and_text(tokenizer, tiny_llama, kind):
    ensemble = make_ensemble(tiny_llama)
    if kind == "messages":
        records = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": r["prompt"]},
                                 {"role": "assistant", "content": r["completion"]}], "group": r["group"]}
                   for r in RECORDS[:3]]
    else:
        records = [{"text": r["prompt"] + r["completion"], "group": r["group"]} for r in RECORDS[:3]]
    results = evaluate_sft(ensemble, tokenizer, records, route_on_prompt=True)
    for example, tokenised in zip(results["examples"], load_sft_dataset(records, tokenizer).examples, strict=True):
        ids, labels = tokenised["input_ids"], tokenised["labels"]
        token = member_token_logprobs(ensemble, ids)  # [K, T]
        targets = torch.tensor([label != IGNORE_INDEX for label in labels])
        first = int(targets.long().argmax())  # the first target: the prompt is everything before it
        expected = token[:, targets].sum(-1)
        assert example["member_logliks"] == pytest.approx(expected.tolist(), abs=2e-4)
        prior = torch.tensor(PI, dtype=torch.float64)
        weights = prior * token[:, 1:first].sum(-1).exp()
        assert example["weights"] == pytest.approx((weights / weights.sum()).tolist(), abs=1e-5)
        if kind == "text":
            assert example["weights"] == pytest.approx(PI) and example["prompt"] == ""
        else:
            assert example["prompt"][-1]["role"] == "user" and first > 10


def test_nmi_against_sklearn():
    generator = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 40):
        for _ in range(25):
            labels = torch.randint(0, 3, (n,), generator=generator)
            clusters = torch.randint(0, int(torch.randint(1, 5, (1,), generator=generator)), (n,), generator=generator)
            assert normalized_mutual_information(labels, clusters) == pytest.approx(
                normalized_mutual_info_score(labels.tolist(), clusters.tolist()), abs=1e-12)
    # A constructed routing: members 2 and 0 own groups A and B exactly; the ungrouped example is left out.
    loglik = torch.tensor([[-9.0, -1.0, -9.0, -1.0, -1.0], [-5.0] * 5, [-1.0, -9.0, -1.0, -9.0, -9.0]])
    metrics = sft_metrics(loglik, torch.full((3,), -math.log(3)), torch.ones(5), ["A", "B", "A", "B", None])
    assert metrics["nmi"] == 1.0 and list(metrics["groups"]) == ["A", "B", "(none)"]
    assert metrics["groups"]["A"]["responsibility"][2] > 0.95
    mixed = sft_metrics(loglik, torch.full((3,), -math.log(3)), torch.ones(5), ["A", "A", "B", "B", "B"])
    assert mixed["nmi"] == pytest.approx(normalized_mutual_info_score([0, 0, 1, 1, 1], [2, 0, 2, 0, 0]))
    assert sft_metrics(loglik, torch.zeros(3), torch.ones(5), ["A"] * 5)["nmi"] is None  # one group: nothing to tell


def test_multiple_choice_route_on_prompt(tokenizer, tiny_llama):
    items = [MultipleChoiceItem("2+2=", ["4", "5", "22"], 0, "math", 1),
             MultipleChoiceItem("capital of France:", [" Paris", " Rome"], 0, "geo", 2),
             MultipleChoiceItem("sky is", [" blue", " green", " red"], 2, "geo", 3)]
    ensemble = make_ensemble(tiny_llama)
    plain = evaluate_multiple_choice(ensemble, tokenizer, items)
    assert plain["weights"] == pytest.approx(PI)  # the saved weights by default
    routed = evaluate_multiple_choice(ensemble, tokenizer, items, route_on_prompt=True, batch_size=2)
    for item, record in zip(items, routed["items"], strict=True):
        prompt = encode_prompt(tokenizer, item.prompt)[0]
        weights = torch.tensor(PI, dtype=torch.float64) * member_token_logprobs(ensemble, prompt).sum(-1).exp()
        weights /= weights.sum()
        assert record["weights"] == pytest.approx(weights.tolist(), abs=1e-5)
        member = torch.tensor(record["member_probs"], dtype=torch.float64)  # [K, C]
        assert record["probs"] == pytest.approx((weights[:, None] * member).sum(0).tolist(), abs=1e-6)
    assert routed["mixture"]["nll"] != pytest.approx(plain["mixture"]["nll"], abs=1e-4)


@pytest.fixture
def saved(tokenizer, tiny_llama, tmp_path):
    """A tiny model and tokenizer folder, a K = 3 ensemble with pi = PI, an SFT file and a file of a user's examples."""
    model_dir, adapters = tmp_path / "model", tmp_path / "adapters"
    copy.deepcopy(tiny_llama).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    ensemble = make_ensemble(tiny_llama)
    ensemble.save_pretrained(adapters)
    data, mine = tmp_path / "held_out.jsonl", tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    mine.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "group"}) + "\n" for r in RECORDS[:2]))
    return model_dir, adapters, data, mine, ensemble


def test_cli_eval_on_sft_data(saved, tokenizer, tmp_path, capsys):
    model_dir, adapters, data, mine, ensemble = saved
    base = ["eval", "--model", str(model_dir), "--adapters", str(adapters), "--data", str(data), "--device", "cpu"]
    out = tmp_path / "results" / "eval.json"
    main([*base, "--output", str(out), "--batch_size", "4"])
    printed = capsys.readouterr().out
    assert "NLL/token" in printed and "member 2" in printed and "group C" in printed and "NMI" in printed
    results = json.loads(out.read_text())
    expected = evaluate_sft(ensemble, tokenizer, RECORDS)
    assert results["task"] == "sft" and results["data"] == str(data)
    assert results["mixture"]["nll"] == pytest.approx(expected["mixture"]["nll"], abs=1e-5)
    assert results["weights"] == pytest.approx(PI)
    for name in ("eval_routing.png", "eval_report.md"):
        assert (out.parent / name).stat().st_size > 0
    main([*base, "--route_on_prompt", "--output", str(tmp_path / "routed.json")])
    routed = json.loads((tmp_path / "routed.json").read_text())
    assert routed["route_on_prompt"] and routed["examples"][0]["weights"] != pytest.approx(PI, abs=1e-3)
    main([*base, "--route_examples", str(mine), "--members", "0", "2", "--output", str(tmp_path / "mine.json")])
    printed = capsys.readouterr().out
    personal = json.loads((tmp_path / "mine.json").read_text())
    assert personal["member_ids"] == [0, 2] and f"posterior weights given {mine}" in printed
    assert personal["route_examples"]["weights"] == pytest.approx(personal["weights"])
    # pi over members 0 and 2 (renormalised) times their likelihood of the two examples
    loglik, _, _ = hand_scores(ensemble, tokenizer, RECORDS[:2])
    posterior = torch.tensor([PI[0], PI[2]], dtype=torch.float64) * (loglik[[0, 2]].sum(1) - loglik.max()).exp()
    assert personal["weights"] == pytest.approx((posterior / posterior.sum()).tolist(), abs=1e-5)
    main([*base, "--weights", "1", "1", "1", "--max_length", "12"])
    printed = capsys.readouterr().out
    assert "weights: 0.333 0.333 0.333" in printed and "(4 truncated to 12)" in printed  # 4 records exceed 12 tokens


def test_cli_eval_multiple_choice_routing_flags(saved, tmp_path, capsys):
    model_dir, adapters, _, mine, _ = saved
    data = tmp_path / "mc.jsonl"
    data.write_text(json.dumps({"prompt": "2+2=", "choices": ["4", "5"], "answer": 0}) + "\n"
                    + json.dumps({"prompt": "sky is", "choices": [" blue", " red"], "answer": 0}) + "\n")
    out = tmp_path / "mc.json"
    main(["eval", "--model", str(model_dir), "--adapters", str(adapters), "--data", str(data), "--route_on_prompt",
          "--route_examples", str(mine), "--output", str(out), "--device", "cpu"])
    results = json.loads(out.read_text())
    assert "acc" in capsys.readouterr().out and results["route_on_prompt"]
    assert results["weights"] == pytest.approx(results["route_examples"]["weights"])
    assert all(len(item["weights"]) == 3 for item in results["items"])


@pytest.mark.parametrize(("content", "message"), [
    (None, "file not found"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b"}\n', "preference"),
    ('{"question": "q", "answer_text": "a"}\n', "no known fields"),
])
def test_cli_eval_bad_data_is_one_line_naming_the_file(saved, tmp_path, capsys, content, message):
    model_dir, adapters, _, _, _ = saved
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(model_dir), "--adapters", str(adapters), "--data", str(path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    last = error.splitlines()[-1]  # a missing file is an argument error: argparse's usage lines come first
    assert last.startswith("renyi-lora eval: error: ") and str(path) in last and message in last, error
    assert "Traceback" not in error and (content is None or error.count("\n") == 0)


def test_cli_eval_flags_that_need_multiple_choice(saved, capsys):
    model_dir, adapters, data, _, _ = saved
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(model_dir), "--adapters", str(adapters), "--data", str(data), "--ood_data",
              str(data)])
    assert exit_info.value.code == 2
    assert "--ood_data applies to multiple-choice data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(model_dir), "--data", str(data), "--base_only", "--route_examples", str(data)])
    assert "--route_examples" in capsys.readouterr().err
