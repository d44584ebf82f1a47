"""Multiple-choice evaluation, free-text uncertainty and the eval / generate commands end to end."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from renyi_lora.cli import main
from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble
from renyi_lora.evaluation.multiple_choice import MultipleChoiceItem, choice_log_probs, evaluate_multiple_choice
from renyi_lora.evaluation.report import format_table, write_report
from renyi_lora.evaluation.token_uncertainty import token_uncertainty

ITEMS = [
    MultipleChoiceItem("2+2=", ["4", "5", "22"], 0, "math", 1),
    MultipleChoiceItem("capital of France:", [" Paris", " Rome"], 0, "geo", 2),
    MultipleChoiceItem("3+4=", ["7", "8"], 1, "math", 3),
    MultipleChoiceItem("sky is", [" blue", " green", " red"], 2, "geo", 4),
    MultipleChoiceItem("x", ["yy", "z"], 0, None, 5),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_ensemble(model, num_members: int = 3, std: float = 0.3, seed: int = 0) -> LoraEnsemble:
    ensemble = LoraEnsemble(model, EnsembleConfig(num_members=num_members, init_seed=seed))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ensemble.lora_layers().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * std)
    return ensemble


def assert_same_tree(got, want) -> None:
    """Nested dicts / lists equal, floats to 1e-9."""
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            assert_same_tree(got[key], want[key])
    elif isinstance(want, list):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same_tree(g, w)
    else:
        assert got == pytest.approx(want, abs=1e-9, nan_ok=True)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("length_normalize", [False, True])
def test_choice_scores_equal_slow_oracle(tokenizer, tiny_llama, length_normalize):
    ensemble = make_ensemble(tiny_llama)
    got = choice_log_probs(ensemble, tokenizer, ITEMS, length_normalize, batch_size=4)  # [K, N, C]
    assert got.shape == (3, len(ITEMS), 3)
    for n, item in enumerate(ITEMS):
        scores = torch.zeros(3, len(item.choices), dtype=torch.float64)
        for c, choice in enumerate(item.choices):
            prompt, full = ids_of(tokenizer, item.prompt), ids_of(tokenizer, item.prompt + choice)
            with torch.no_grad():  # full log-softmax over the vocabulary, one row at a time
                log_probs = torch.log_softmax(ensemble(torch.tensor([full]))[:, 0].double(), dim=-1)  # [K, T, V]
            for t in range(len(prompt), len(full)):
                scores[:, c] += log_probs[:, t - 1, full[t]]
            if length_normalize:
                scores[:, c] /= len(full) - len(prompt)
        expected = torch.log_softmax(scores, dim=-1)
        torch.testing.assert_close(got[:, n, : len(item.choices)], expected, atol=1e-5, rtol=1e-5)
        assert torch.isneginf(got[:, n, len(item.choices):]).all()


def test_results_have_every_field_and_are_strict_json(tokenizer, tiny_llama):
    results = evaluate_multiple_choice(make_ensemble(tiny_llama), tokenizer, ITEMS)
    json.dumps(results, allow_nan=False)  # undefined scores are null, not NaN
    mixture_fields = {"accuracy", "ece", "nll", "brier", "total", "aleatoric", "epistemic", "auroc_mi_errors",
                      "auroc_total_errors", "aurc", "aurc_mi", "accuracy_at_80"}
    assert set(results["mixture"]) == mixture_fields
    assert [set(m) for m in results["members"]] == [{"accuracy", "ece", "nll", "brier", "entropy"}] * 3
    assert list(results["groups"]) == ["math", "geo", "(none)"]
    for group in results["groups"].values():
        assert set(group["mixture"]) == mixture_fields and len(group["members"]) == 3
        assert sum(group["routing"]) == pytest.approx(1.0)
    assert results["routing_matrix"]["groups"] == ["math", "geo", "(none)"]
    matrix = results["routing_matrix"]["matrix"]
    assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
    assert set(results["mean_mi_by_group"]) == {"math", "geo", "(none)"}
    assert results["mean_mi_by_group"]["math"] > 0  # distinct members disagree
    item = results["items"][0]
    assert len(item["probs"]) == 3 and sum(item["probs"]) == pytest.approx(1.0)
    assert item["total"] == pytest.approx(item["aleatoric"] + item["epistemic"])


def test_metrics_on_a_constructed_case(tokenizer, tiny_llama):
    """Routing and accuracy follow from the member scores by the stated formulas."""
    from renyi_lora.evaluation.multiple_choice import multiple_choice_metrics

    member = torch.tensor([[[0.9, 0.1], [0.8, 0.2]], [[0.5, 0.5], [0.1, 0.9]]], dtype=torch.float64).log()
    metrics = multiple_choice_metrics(member, torch.tensor([0, 1]), torch.tensor([0.5, 0.5]).log())
    assert metrics["members"][0]["accuracy"] == 0.5 and metrics["members"][1]["accuracy"] == 1.0
    # mixture: [0.7, 0.3] (right), [0.45, 0.55] (right)
    assert metrics["mixture"]["accuracy"] == 1.0
    assert metrics["mixture"]["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.55)) / 2)
    # responsibility for the correct answer: item 0: 0.9 vs 0.5; item 1: 0.2 vs 0.9
    expected = [(0.9 / 1.4 + 0.2 / 1.1) / 2, (0.5 / 1.4 + 0.9 / 1.1) / 2]
    assert metrics["routing"] == pytest.approx(expected)
    assert metrics["mixture"]["auroc_mi_errors"] is None  # no errors: undefined


def test_base_only_equals_one_member_with_zero_b(tokenizer, tiny_llama):
    fresh = LoraEnsemble(copy.deepcopy(tiny_llama), EnsembleConfig(num_members=1))  # B = 0: the base model
    ensemble = make_ensemble(tiny_llama, std=0.5)
    base_only = evaluate_multiple_choice(ensemble, tokenizer, ITEMS, base_only=True)
    single = evaluate_multiple_choice(fresh, tokenizer, ITEMS)
    assert base_only["num_members"] == 1
    for key in ("mixture", "members", "groups", "routing", "items"):
        assert_same_tree(base_only[key], single[key])
    assert not ensemble.is_disabled  # the adapters are back on


def test_member_subset_gives_those_members_metrics(tokenizer, tiny_llama, tmp_path):
    base = copy.deepcopy(tiny_llama)
    ensemble = make_ensemble(tiny_llama)
    ensemble.save_pretrained(tmp_path / "ensemble")
    full = evaluate_multiple_choice(ensemble, tokenizer, ITEMS)
    subset = LoraEnsemble.from_pretrained(base, tmp_path / "ensemble", members=[0, 2])
    part = evaluate_multiple_choice(subset, tokenizer, ITEMS, member_ids=[0, 2])
    assert part["member_ids"] == [0, 2]
    assert_same_tree(part["members"], [full["members"][0], full["members"][2]])


def test_free_text_mi_zero_for_identical_members_positive_for_distinct(tokenizer, tiny_llama):
    prompts, completions = ["hello", "the answer is"], [" world", " 42, surely"]
    identical = token_uncertainty(make_ensemble(copy.deepcopy(tiny_llama), std=0.0), tokenizer, prompts, completions)
    distinct = token_uncertainty(make_ensemble(tiny_llama), tokenizer, prompts, completions, batch_size=1)
    for same, different, completion in zip(identical, distinct, completions, strict=True):
        assert "".join(same["tokens"]) == completion and len(same["mi"]) == len(completion)
        assert max(same["mi"]) < 1e-5 and same["loglik_variance"] < 1e-8
        assert min(different["mi"]) > 1e-4 and different["mean_mi"] > 1e-3 and different["loglik_variance"] > 0
        assert all(e >= m for e, m in zip(different["entropy"], different["mi"], strict=True))


def test_free_text_prompt_can_be_chat_messages(tokenizer, tiny_llama):
    (record,) = token_uncertainty(make_ensemble(tiny_llama), tokenizer, [[{"role": "user", "content": "hi"}]],
                                  ["yo"])
    assert record["tokens"] == ["y", "o"]


def test_format_table_aligns_columns():
    table = format_table(["", "n", "acc"], [["mixture", 10, 0.5], ["member 12", 3, None]]).splitlines()
    assert table == ["            n    acc", "mixture    10  0.500", "member 12   3      -"]


def test_write_report_writes_json_plots_and_markdown(tokenizer, tiny_llama, tmp_path):
    results = evaluate_multiple_choice(make_ensemble(tiny_llama), tokenizer, ITEMS)
    paths = write_report(results, tmp_path / "out" / "eval.json")
    assert [p.name for p in paths] == ["eval.json", "eval_reliability.png", "eval_routing.png",
                                       "eval_mi_histogram.png", "eval_report.md"]
    assert all(p.stat().st_size > 0 for p in paths)
    report = paths[-1].read_text()
    assert "eval_routing.png" in report and "mixture" in report


@pytest.fixture
def saved(tokenizer, tiny_llama, tmp_path):
    """A tiny model, its tokenizer and a K = 3 ensemble saved to folders, and a multiple-choice file."""
    model_dir, adapters = tmp_path / "model", tmp_path / "adapters"
    base = copy.deepcopy(tiny_llama)
    base.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    make_ensemble(tiny_llama).save_pretrained(adapters)
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"prompt": i.prompt, "choices": i.choices, "answer": i.answer,
                                        "group": i.group}) + "\n" for i in ITEMS))
    return model_dir, adapters, data


def test_cli_eval_end_to_end(saved, tmp_path, capsys):
    model_dir, adapters, data = saved
    out = tmp_path / "results" / "eval.json"
    main(["eval", "--model", str(model_dir), "--adapters", str(adapters), "--data", str(data), "--output", str(out),
          "--batch_size", "3"])
    printed = capsys.readouterr().out
    assert "mixture" in printed and "member 2" in printed and "group geo" in printed and "AUROC(MI)" in printed
    results = json.loads(out.read_text())
    assert results["num_members"] == 3 and results["num_items"] == len(ITEMS)
    for name in ("eval_reliability.png", "eval_routing.png", "eval_mi_histogram.png", "eval_report.md"):
        assert (out.parent / name).stat().st_size > 0
    main(["eval", "--model", str(model_dir), "--adapters", str(adapters), "--data", str(data), "--members", "0", "2",
          "--output", str(tmp_path / "subset.json")])
    subset = json.loads((tmp_path / "subset.json").read_text())
    assert subset["member_ids"] == [0, 2]
    assert subset["members"][1] == pytest.approx(results["members"][2])
    main(["eval", "--model", str(model_dir), "--data", str(data), "--base_only"])
    assert "base model" in capsys.readouterr().out


def test_cli_generate_end_to_end(saved, tmp_path, capsys):
    model_dir, adapters, _ = saved
    out = tmp_path / "generated.json"
    main(["generate", "--model", str(model_dir), "--adapters", str(adapters), "--prompt", "hello", "--prompt", "ab",
          "--mode", "members", "--max_new_tokens", "4", "--output", str(out), "--route_on_prompt"])
    printed = capsys.readouterr().out
    assert "prompt: 'hello'" in printed and "prompt: 'ab'" in printed and "[member 2]" in printed
    results = json.loads(out.read_text())
    assert len(results) == 2 and len(results[0]["continuations"]) == 3
    assert {"id", "text", "prob", "mi", "entropy"} == set(results[0]["continuations"][0]["tokens"][0])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hi there\n\nsecond\n")
    main(["generate", "--model", str(model_dir), "--adapters", str(adapters), "--prompts_file", str(prompts),
          "--chat", "--do_sample", "--temperature", "0.8", "--top_p", "0.9", "--max_new_tokens", "3"])
    printed = capsys.readouterr().out
    assert printed.count("[mixture]") == 2 and "prompt: 'second'" in printed


def test_cli_bad_input_is_one_clear_line(saved, tmp_path, capsys):
    model_dir, adapters, _ = saved
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(model_dir), "--adapters", str(adapters), "--data", str(bad)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "line 1" in error and "answer" in error
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(model_dir), "--data", str(bad)])
    assert "--adapters DIR is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(model_dir), "--adapters", str(adapters)])
    assert "--prompt" in capsys.readouterr().err
