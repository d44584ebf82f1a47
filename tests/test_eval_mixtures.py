"""Adapters trained elsewhere scored as one mixture, out-of-distribution detection and selective accuracy."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from renyi_lora.cli import main
from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble, load_adapter_mixture
from renyi_lora.evaluation.ood import detection_aurocs, prompt_scores
from renyi_lora.io import export_peft
from renyi_lora.uncertainty import accuracy_at_coverage, mixture_log_probs

pytestmark = pytest.mark.usefixtures("one_thread")


def random_ensemble(model, num_members: int, seed: int, **config) -> LoraEnsemble:
    ensemble = LoraEnsemble(model, EnsembleConfig(num_members=num_members, init_seed=seed, **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ensemble.lora_layers().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.3)
    return ensemble


def random_peft_adapter(model, path, seed: int):
    """A plain PEFT LoRA (rank 4, rsLoRA scaling, q/v only) with random B, saved to ``path``; its logits on ``ids``."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                 use_rslora=True))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    peft_model.save_pretrained(path)
    return peft_model


def test_mixture_of_folders_reproduces_every_member(tiny_llama, tmp_path):
    """A saved ensemble (K = 2, rank 8, all-linear), one of its members exported to PEFT, and an adapter made by
    PEFT itself (rank 4, rsLoRA, two modules) load as one K = 4 ensemble whose members give the originals' logits."""
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    ours = random_ensemble(copy.deepcopy(tiny_llama), 2, seed=1)
    ours.save_pretrained(tmp_path / "ours")
    export_peft(ours, tmp_path / "member_1", 1)
    with torch.no_grad():
        want_ours = ours(ids)  # [2, 1, T, V]
    peft_model = random_peft_adapter(tiny_llama, tmp_path / "peft", seed=2)
    with torch.no_grad():
        want_peft = peft_model(input_ids=ids).logits
    mixture = load_adapter_mixture(copy.deepcopy(tiny_llama), [tmp_path / "ours", tmp_path / "member_1",
                                                               tmp_path / "peft"])
    assert mixture.num_members == 4
    with torch.no_grad():
        got = mixture(ids)  # [4, 1, T, V]
    torch.testing.assert_close(got[:2], want_ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], want_ours[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[3], want_peft, atol=1e-5, rtol=1e-5)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path / "peft")  # the folder is a real adapter
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want_peft)
    picked = load_adapter_mixture(copy.deepcopy(tiny_llama), [tmp_path / "ours", tmp_path / "peft"], members=[2, 0])
    with torch.no_grad():
        torch.testing.assert_close(picked(ids)[0], want_peft, atol=1e-5, rtol=1e-5)


def test_mixture_refuses_what_it_cannot_read(tiny_llama, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a saved ensemble"):
        load_adapter_mixture(tiny_llama, [tmp_path / "empty", tmp_path / "empty"])
    random_peft_adapter(tiny_llama, tmp_path / "peft", seed=0)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="only plain LoRA"):
        load_adapter_mixture(tiny_llama, [tmp_path / "dora", tmp_path / "peft"])
    with pytest.raises(ValueError, match="members"):
        load_adapter_mixture(tiny_llama, [tmp_path / "peft", tmp_path / "peft"], members=[2])


def test_prompt_scores_equal_a_slow_oracle(tokenizer, tiny_llama):
    """Per-token MI and the members' spread of mean token log-likelihood along each prompt, from full softmaxes."""
    ensemble = random_ensemble(tiny_llama, 3, seed=0)
    prompts = ["abc de", "x", "hello world!"]
    scores = prompt_scores(ensemble, tokenizer, prompts, batch_size=2)
    for n, prompt in enumerate(prompts):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            assert scores["prompt_mi"][n] == 0 and scores["prompt_spread"][n] == 0
            continue
        with torch.no_grad():
            log_probs = torch.log_softmax(ensemble(torch.tensor([ids]))[:, 0, :-1].double(), -1)  # [K, T-1, V]
        mixture = torch.logsumexp(log_probs, 0) - torch.log(torch.tensor(3.0))  # [T-1, V]
        total = -(mixture.exp() * mixture).sum(-1)
        aleatoric = -(log_probs.exp() * log_probs).sum(-1).mean(0)
        assert scores["prompt_mi"][n].item() == pytest.approx((total - aleatoric).mean().item(), abs=1e-5)
        token = log_probs.gather(-1, torch.tensor(ids[1:])[None, :, None].expand(3, -1, 1))[..., 0]  # [K, T-1]
        per_member = token.mean(-1)
        assert scores["prompt_spread"][n].item() == pytest.approx(per_member.std(unbiased=False).item(), abs=1e-5)


def test_detection_aurocs_rank_out_of_distribution_items_first():
    got = detection_aurocs({"mi": [0.1, 0.2, 0.3], "only_in": [1.0]}, {"mi": [0.25, 0.9]})
    assert list(got) == ["mi"]
    assert got["mi"] == pytest.approx(5 / 6)  # 0.25 beats 0.1 and 0.2; 0.9 beats all three


def test_accuracy_at_coverage_by_hand():
    uncertainty = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    correct = torch.tensor([True, True, False, True, False])
    assert accuracy_at_coverage(uncertainty, correct, 0.8) == pytest.approx(3 / 4)  # keeps the 4 most confident
    assert accuracy_at_coverage(uncertainty, correct, 0.4) == pytest.approx(1.0)
    assert accuracy_at_coverage(uncertainty, correct, 1.0) == pytest.approx(3 / 5)
    tied = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.5])  # a tie group keeps its errors pro rata
    assert accuracy_at_coverage(tied, correct, 0.4) == pytest.approx(1 - 0.25)
    with pytest.raises(ValueError, match="coverage"):
        accuracy_at_coverage(uncertainty, correct, 0.0)


def test_cli_eval_with_ood_data_and_several_folders(tiny_llama, tokenizer, tmp_path, capsys):
    """Two PEFT adapters (a deep ensemble trained elsewhere) and out-of-distribution items through the CLI: the JSON
    holds every AUROC and per-item member probabilities from which the mixture's are recomputed."""
    model_dir = tmp_path / "model"
    copy.deepcopy(tiny_llama).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    for seed in (0, 1):
        random_peft_adapter(tiny_llama, tmp_path / f"peft_{seed}", seed)
    rows = [{"prompt": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1)], "answer": 0, "group": "sum"}
            for a, b in ((1, 2), (3, 4), (2, 2), (5, 1))]
    ood = [{"prompt": f"capital of {c}:", "choices": [" yes", " no"], "answer": 1, "group": "geo"}
           for c in ("France", "Peru", "Chad")]
    for name, records in (("in.jsonl", rows), ("out.jsonl", ood)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "eval" / "eval.json"
    main(["eval", "--model", str(model_dir), "--adapters", str(tmp_path / "peft_0"), str(tmp_path / "peft_1"),
          "--data", str(tmp_path / "in.jsonl"), "--ood_data", str(tmp_path / "out.jsonl"), "--output", str(out)])
    printed = capsys.readouterr().out
    assert "out-of-distribution vs in" in printed and "prompt_mi" in printed
    results = json.loads(out.read_text())
    assert results["num_members"] == 2 and results["ood"]["num_items"] == 3
    assert set(results["ood"]["detection"]) == {"auroc_total", "auroc_epistemic", "auroc_prompt_mi",
                                                "auroc_prompt_spread"}
    for item in results["items"] + results["ood"]["items"]:
        member = torch.tensor(item["member_probs"], dtype=torch.float64)  # [K, C]
        mixed = mixture_log_probs(member.log()[:, None])[0].exp()
        assert mixed.tolist() == pytest.approx(item["probs"], abs=1e-9)
        assert isinstance(item["prompt"], str) and item["prompt_spread"] >= 0
    inside = torch.tensor([i["prompt_mi"] for i in results["items"]])
    outside = torch.tensor([i["prompt_mi"] for i in results["ood"]["items"]])
    recomputed = (outside[:, None] > inside[None]).double().mean().item()  # no ties between continuous scores
    assert results["ood"]["detection"]["auroc_prompt_mi"] == pytest.approx(recomputed)
    for name in ("eval_ood_mi.png", "eval_risk_coverage.png"):
        assert (out.parent / name).stat().st_size > 0
