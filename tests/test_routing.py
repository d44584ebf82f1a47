"""Posterior routing and the sequence mixture: the saved mixture weights pi by default, the posterior given the prompt
and given a user's examples against hand computations, and sequence-mixture decoding against a slow oracle."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import ids_of, make_llama, member_token_logprobs, weighted_members

from renyi_lora.cli import main
from renyi_lora.ensemble import LoraEnsemble
from renyi_lora.evaluation.generate import generate
from renyi_lora.evaluation.inference import load_for_inference, pad_right
from renyi_lora.evaluation.ood import prompt_scores
from renyi_lora.evaluation.routing import posterior_weights, prompt_log_weights
from renyi_lora.evaluation.token_uncertainty import prior_log_weights, token_uncertainty

PI = [0.5, 0.3, 0.2]
PROMPTS = ["hello there", "ab", "a longer prompt, with commas"]
EXAMPLES = [{"prompt": "q1:", "completion": " yes, surely"}, {"prompt": "who?", "completion": " me"},
            {"prompt": "x", "completion": " y z"}]
EOS = 1

pytestmark = pytest.mark.usefixtures("one_thread")


def make_ensemble(model, num_members: int = 3, std: float = 0.5, seed: int = 0, pi=PI) -> LoraEnsemble:
    """Distinct members (random B) with mixture weights ``pi`` (as if learned)."""
    return weighted_members(model, num_members, pi, std, seed)


def test_prior_is_the_saved_weights_unless_given(tokenizer, tiny_llama):
    ensemble = make_ensemble(tiny_llama)
    torch.testing.assert_close(prior_log_weights(ensemble).exp(), torch.tensor(PI, dtype=torch.float64))
    torch.testing.assert_close(prior_log_weights(ensemble, [1, 1, 2]).exp(),
                               torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64))
    with ensemble.adapters_disabled():
        assert prior_log_weights(ensemble).tolist() == [0.0]
    results = generate(ensemble, tokenizer, PROMPTS[:1], max_new_tokens=1)
    assert results[0].weights == pytest.approx(PI)
    (record,) = token_uncertainty(ensemble, tokenizer, ["hi"], [" yo"])
    expected = torch.logsumexp(torch.tensor(record["member_logliks"]) + torch.tensor(PI).log(), 0)
    assert record["mixture_loglik"] == pytest.approx(expected.item(), abs=1e-5)
    saved, given = prompt_scores(ensemble, tokenizer, PROMPTS), prompt_scores(ensemble, tokenizer, PROMPTS, PI)
    torch.testing.assert_close(saved["prompt_spread"], given["prompt_spread"])
    assert not torch.allclose(saved["prompt_spread"], prompt_scores(ensemble, tokenizer, PROMPTS, [1, 1, 1])
                              ["prompt_spread"])


def test_posterior_given_examples_equals_hand_computation(tokenizer, tiny_llama):
    ensemble = make_ensemble(tiny_llama)
    loglik = torch.zeros(3, dtype=torch.float64)
    for example in EXAMPLES:
        # As in training: plain prompt ids (this tokenizer adds no BOS), the completion's ids and EOS as targets.
        prompt = ids_of(tokenizer, example["prompt"])
        ids = prompt + ids_of(tokenizer, example["completion"]) + [EOS]
        loglik += member_token_logprobs(ensemble, ids)[:, len(prompt) - 1:].sum(-1)
    expected = torch.tensor(PI, dtype=torch.float64) * (loglik - loglik.max()).exp()
    got = posterior_weights(ensemble, tokenizer, EXAMPLES, batch_size=2)
    torch.testing.assert_close(got, expected / expected.sum(), atol=1e-6, rtol=1e-5)
    assert got.sum().item() == pytest.approx(1.0) and (got - torch.tensor(PI, dtype=torch.float64)).abs().max() > 0.05
    # An explicit prior replaces the saved one.
    flat = posterior_weights(ensemble, tokenizer, EXAMPLES, weights=[1, 1, 1])
    torch.testing.assert_close(flat, torch.softmax(loglik, 0), atol=1e-6, rtol=1e-5)


def test_route_on_prompt_defaults_to_the_saved_prior(tokenizer, tiny_llama):
    ensemble = make_ensemble(tiny_llama)
    rows = [ids_of(tokenizer, p) for p in PROMPTS]
    got = prompt_log_weights(ensemble, rows).exp()  # [K, B]
    for b, ids in enumerate(rows):
        expected = torch.tensor(PI, dtype=torch.float64) * member_token_logprobs(ensemble, ids).sum(-1).exp()
        torch.testing.assert_close(got[:, b], expected / expected.sum(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("route_on_prompt", [False, True])
def test_sequence_mixture_decoding_is_the_sequence_mixture(tokenizer, tiny_llama, route_on_prompt):
    """The product of the sequence mode's step probabilities along its continuation is, at every prefix, the sequence
    mixture sum_k w_k prod_t p_k(y_t | x, y_<t) of a slow per-member oracle; the token mixture's is not."""
    ensemble = make_ensemble(tiny_llama)
    kwargs = {"max_new_tokens": 10, "route_on_prompt": route_on_prompt, "eos_token_id": -1}  # never stop early
    sequence = generate(ensemble, tokenizer, PROMPTS, **kwargs)
    token = generate(ensemble, tokenizer, PROMPTS, mixture="token", **kwargs)
    differs = 0.0
    for prompt, seq, tok in zip(PROMPTS, sequence, token, strict=True):
        prompt_ids = ids_of(tokenizer, prompt)
        log_prior = torch.tensor(PI, dtype=torch.float64).log()
        if route_on_prompt:
            log_prior = torch.log_softmax(log_prior + member_token_logprobs(ensemble, prompt_ids).sum(-1), dim=0)
        assert seq.weights == pytest.approx(log_prior.exp().tolist(), abs=1e-6)
        for result, mode in ((seq, "sequence"), (tok, "token")):
            generated = [t.id for t in result.continuations[0].tokens]
            member = member_token_logprobs(ensemble, prompt_ids + generated)[:, len(prompt_ids) - 1:]  # [K, L]
            mixture = torch.logsumexp(log_prior[:, None] + member.cumsum(-1), dim=0)  # [L]: log p_mix(y_<=t | x)
            steps = torch.tensor([t.prob for t in result.continuations[0].tokens], dtype=torch.float64).log()
            if mode == "sequence":
                assert len(generated) == 10
                torch.testing.assert_close(steps.cumsum(0), mixture, atol=1e-4, rtol=1e-5)
            else:  # the token mixture's steps are the fixed-weight mixture of the members' next-token probabilities
                torch.testing.assert_close(steps, torch.logsumexp(log_prior[:, None] + member, dim=0), atol=1e-5,
                                           rtol=1e-5)
                differs = max(differs, (steps.cumsum(0) - mixture).abs().max().item())
    assert differs > 1e-2  # the token mixture is not the sequence mixture


def test_sequence_mixture_greedy_agrees_with_the_lm_eval_model(tokenizer, tiny_llama):
    """The predictive shared with lm-eval's ``renyi`` model: its mixture log-likelihood of the continuation that
    sequence-mode greedy decoding produced is the sum of the step log-probabilities, and it calls it greedy."""
    pytest.importorskip("lm_eval")
    from renyi_lora.evaluation.harness import sequence_scores

    ensemble = make_ensemble(tiny_llama)
    results = generate(ensemble, tokenizer, PROMPTS, max_new_tokens=8, eos_token_id=-1)
    prompts = [ids_of(tokenizer, p) for p in PROMPTS]
    generated = [[t.id for t in r.continuations[0].tokens] for r in results]
    scores = sequence_scores(ensemble, *pad_right(prompts, generated, 0), log_weights=prior_log_weights(ensemble))
    steps = torch.tensor([sum(torch.tensor(t.prob).log().item() for t in r.continuations[0].tokens) for r in results])
    torch.testing.assert_close(scores["mixture_loglik"].float(), steps, atol=1e-4, rtol=1e-5)
    assert scores["is_greedy"].all()


def test_load_for_inference_keeps_the_saved_weights(tokenizer, tiny_llama, tmp_path):
    model_dir = tmp_path / "model"
    copy.deepcopy(tiny_llama).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    make_ensemble(tiny_llama, pi=[0.1, 0.6, 0.3]).save_pretrained(tmp_path / "ensemble")
    folder = str(tmp_path / "ensemble")
    ensemble, _ = load_for_inference(str(model_dir), [folder], device="cpu")
    assert ensemble.mixture_weights.tolist() == pytest.approx([0.1, 0.6, 0.3])
    subset, _ = load_for_inference(str(model_dir), [folder], members=[0, 2], device="cpu")
    assert subset.mixture_weights.tolist() == pytest.approx([0.25, 0.75])
    joined, _ = load_for_inference(str(model_dir), [folder, folder], device="cpu")  # several folders: uniform
    assert joined.mixture_weights.tolist() == pytest.approx([1 / 6] * 6)
    pytest.importorskip("lm_eval")
    from renyi_lora.evaluation.harness import RenyiLM

    lm = RenyiLM(pretrained=str(model_dir), adapters=folder, device="cpu")
    assert lm.log_weights.exp().tolist() == pytest.approx([0.1, 0.6, 0.3])
    assert RenyiLM(pretrained=str(model_dir), adapters=folder, weights="1|1|2", device="cpu"
                   ).log_weights.exp().tolist() == pytest.approx([0.25, 0.25, 0.5])


@pytest.fixture
def saved(tokenizer, tiny_llama, tmp_path):
    """A tiny model and tokenizer folder, a K = 3 ensemble with pi = PI, and a file of a user's examples."""
    model_dir, adapters = tmp_path / "model", tmp_path / "adapters"
    copy.deepcopy(tiny_llama).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    make_ensemble(tiny_llama).save_pretrained(adapters)
    examples = tmp_path / "mine.jsonl"
    examples.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return model_dir, adapters, examples


def test_cli_generate_route_examples_and_mixture_flag(saved, tokenizer, tiny_llama, tmp_path, capsys):
    model_dir, adapters, examples = saved
    expected = posterior_weights(LoraEnsemble.from_pretrained(make_llama(len(tokenizer)), adapters), tokenizer,
                                 EXAMPLES)  # make_llama: the saved base model (tiny_llama now carries the adapters)
    out = tmp_path / "generated.json"
    main(["generate", "--model", str(model_dir), "--adapters", str(adapters), "--prompt", "hello", "--max_new_tokens",
          "4", "--route_examples", str(examples), "--output", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert f"posterior weights given {examples}: " + " ".join(f"{w:.3f}" for w in expected.tolist()) in printed
    assert json.loads(out.read_text())[0]["weights"] == pytest.approx(expected.tolist(), abs=1e-6)
    for mixture in ("sequence", "token"):
        main(["generate", "--model", str(model_dir), "--adapters", str(adapters), "--prompt", "hello",
              "--max_new_tokens", "6", "--mixture", mixture, "--output", str(tmp_path / f"{mixture}.json"),
              "--device", "cpu"])
    probs = {m: [t["prob"] for t in json.loads((tmp_path / f"{m}.json").read_text())[0]["continuations"][0]["tokens"]]
             for m in ("sequence", "token")}
    assert probs["sequence"][0] == pytest.approx(probs["token"][0], abs=1e-6)  # the first step is the same mixture
    assert probs["sequence"] != pytest.approx(probs["token"], abs=1e-4)


@pytest.mark.parametrize(("flags", "message"), [
    (["--route_examples", "/no/such/mine.jsonl"], "--route_examples /no/such/mine.jsonl: file not found"),
    (["--mixture", "vote"], "mixture"),
])
def test_cli_generate_bad_flags(saved, capsys, flags, message):
    model_dir, adapters, _ = saved
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(model_dir), "--adapters", str(adapters), "--prompt", "hi", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_route_examples_of_another_format_names_the_file(saved, tmp_path, capsys):
    model_dir, adapters, _ = saved
    bad = tmp_path / "prefs.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(model_dir), "--adapters", str(adapters), "--prompt", "hi",
              "--route_examples", str(bad)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and str(bad) in error and "line 1" in error and "preference" in error


def test_personalisation_doc_snippet_runs_as_written(tokenizer, tiny_llama, tmp_path, monkeypatch, capsys):
    """docs/personalisation.md's Python block, on a tiny model in place of smollm2-135m and a saved K = 3 ensemble in
    out/sft; the weights it prints are the posterior given its two examples."""
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "personalisation.md"
    (snippet,) = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    model_dir = tmp_path / "model"
    copy.deepcopy(tiny_llama).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    make_ensemble(tiny_llama).save_pretrained(tmp_path / "out" / "sft")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet.replace('"smollm2-135m"', repr(str(model_dir))), str(doc), "exec"), namespace)  # noqa: S102
    mine = [{"prompt": "Sky colour?", "completion": " Grey, as ever."},
            {"prompt": "Sea colour?", "completion": " Grey, as ever."}]
    expected = posterior_weights(namespace["ensemble"], tokenizer, mine)
    torch.testing.assert_close(namespace["weights"], expected)
    printed = capsys.readouterr().out
    assert f"posterior given mine: {expected.tolist()}" in printed and f"saved pi: {PI}" not in printed
    assert namespace["result"].weights == pytest.approx(expected.tolist())
