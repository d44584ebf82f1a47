"""The survey rows of the quality benchmark (benchmarks/quality/survey_run.py): the loss falls on the answer tokens
only, the training's member loads are read from the log history by hand, and the driver runs every row end to end
on a tiny model and tiny survey files, offline."""

from __future__ import annotations

import json
import random

import pytest
from conftest import make_llama, merged_tokenizer

from benchmarks.quality.run import main
from benchmarks.quality.survey import ANES, GSS, RespondentEncoder, respondent
from benchmarks.quality.survey_metrics import load_respondents
from benchmarks.quality.survey_run import answer_labels, member_loads
from benchmarks.quality.survey_tables import target_checks
from renyi_lora.data.sft import load_sft_dataset
from renyi_lora.likelihoods import IGNORE_INDEX

pytestmark = pytest.mark.usefixtures("one_thread")


def write_survey(folder, survey, splits: dict[str, int], seed: int = 0) -> None:
    """Random respondents of ``survey`` in ``survey_<name>_<split>.jsonl``; Democrats lean to the first answer and
    Republicans to the last, some items unanswered."""
    rng = random.Random(seed)
    for split, count in splits.items():
        rows = []
        for n in range(count):
            party = rng.choice([0, 1, 3, 5, 6])
            lean = 0 if party < 3 else -1
            answers = [None if rng.random() < 0.1 else
                       (range(len(item.answers))[lean] if rng.random() < 0.7 else rng.randrange(len(item.answers)))
                       for item in survey.items]
            if sum(a is not None for a in answers) < 4:
                answers = [0] * len(survey.items)
            rows.append(respondent(survey, answers, party, {"id": f"{split}-{n}", "year": 1996}))
        (folder / f"survey_{survey.name}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_loss_falls_on_the_answer_tokens_only(tmp_path):
    tokenizer = merged_tokenizer()
    write_survey(tmp_path, ANES, {"train": 5})
    path = tmp_path / "survey_anes_train.jsonl"
    respondents = load_respondents(path)
    encode = RespondentEncoder(tokenizer, ANES)
    data = answer_labels(load_sft_dataset(path, tokenizer), respondents, encode, "answers")
    for example, answers in zip(data.examples, respondents.answers, strict=True):
        targets = [tokenizer.decode([t]).strip() for t in example["labels"] if t != IGNORE_INDEX]
        given = [ANES.items[i].answers[a].strip() for i, a in enumerate(answers) if a >= 0]
        assert targets == given  # the digits / yes-no of each answered line, in order, and nothing else
    whole = answer_labels(load_sft_dataset(path, tokenizer), respondents, encode, "completion")
    assert sum(t != IGNORE_INDEX for t in whole.examples[0]["labels"]) > 6 * len(ANES.items)  # every line's text


def test_member_loads_by_hand():
    def window(effective: float, democrat: float, republican: float) -> dict:
        return {"loss": 1.0, "routing/effective_members": effective, "routing/Democrat/member_0": democrat,
                "routing/Democrat/member_1": 1 - democrat, "routing/Republican/member_0": republican,
                "routing/Republican/member_1": 1 - republican}

    history = [window(3.5, 0.5, 0.9), {"step": 10, "revived": [[1, 0]], "load": [0.995, 0.005]}, window(1.5, 0.8, 0.4),
               {"step": 20, "revived": [[1, 0], [0, 1]], "load": [0.5, 0.5]}]
    loads = member_loads(history, {"Democrat": 0.75, "Republican": 0.25}, 2)
    # the last window: member 0 holds 0.75 * 0.8 + 0.25 * 0.4 = 0.7, member 1 0.75 * 0.2 + 0.25 * 0.6 = 0.3
    assert loads == {"effective_members": 1.5, "min_share": pytest.approx(0.3), "shares": [0.7, 0.3], "revivals": 3}
    assert member_loads([{"loss": 1.0}], {"all": 1.0}, 2)["min_share"] is None


def test_survey_driver_runs_every_row_offline(tmp_path):
    """Every row of the issue on a tiny Llama and tiny ANES and GSS files, through run.py's --task survey."""
    tokenizer = merged_tokenizer()
    make_llama(len(tokenizer), num_layers=2).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    write_survey(tmp_path, ANES, {"train": 12, "test": 10})
    write_survey(tmp_path, GSS, {"train": 12, "test": 10, "test_shift": 10}, seed=1)
    main(["--task", "survey", "--data_dir", str(tmp_path), "--model", str(tmp_path / "model"), "--num_members", "2",
          "--rank", "2", "--max_steps", "2", "--batch_size", "4", "--seeds", "0", "--lcm_restarts", "1",
          "--bf16", "false", "--out", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")])
    results = json.loads((tmp_path / "out" / "quality_survey.json").read_text())["report"]
    rows = ["independent marginals", "group oracle (told the party)", "latent classes K=2 (EM)", "LoRA r",
            "LoRA r x 2", "deep ensemble K=2", "renyi K=2 a=0", "renyi K=2 a=1", "renyi K=2 a=2",
            "renyi K=2 a=1 + learned pi"]
    assert list(results["anes"]["results"]) == ["test"] and list(results["gss"]["results"]) == ["test", "test_shift"]
    for survey in ("anes", "gss"):
        for split, methods in results[survey]["results"].items():
            assert list(methods) == rows, (survey, split)
            for name, runs in methods.items():
                assert len(runs) == 1 and runs[0]["joint"]["respondents"] == 10
                assert runs[0]["members"] == (3 if "oracle" in name else 1 if name.startswith(("LoRA", "indep"))
                                              else 2)
            assert methods["LoRA r"][0]["items"]["spearman"] is None  # one member: no disagreement
        for name in rows[6:]:
            (load,) = results[survey]["loads"][name]
            assert 1 <= load["effective_members"] <= 2 and 0 <= load["min_share"] <= 0.5 + 1e-6
            assert isinstance(load["revivals"], int) and sum(load["mixture_weights"]) == pytest.approx(1, abs=1e-3)
        assert results[survey]["loads"]["renyi K=2 a=1"][0]["mixture_weights"] == [0.5, 0.5]  # pi not learned
    table = (tmp_path / "out" / "quality_survey.md").read_text()
    assert "| renyi K=2 a=1 + learned pi | 2 | 1 |" in table and "## GSS test_shift (10 respondents" in table
    assert "| joint NLL below LoRA r by > 2 seed std |" in table
    assert (tmp_path / "out" / "quality_survey_anes_mi_vs_js.png").stat().st_size > 0
    assert (tmp_path / "out" / "quality_survey_gss_routing.png").stat().st_size > 0


def fake_result(nll: float, steer: float, nmi: float, rho: float | None, members: int = 4) -> dict:
    return {"members": members, "joint": {"nll": nll, "nll_per_answer": nll / 6},
            "steering": {k: {"nll": steer, "accuracy": 0.5, "nll_prior": steer + 0.1} for k in ("2", "3")},
            "party": {"nmi": nmi}, "items": {"spearman": rho}}


def test_target_checks_by_hand():
    methods = {"LoRA r": [fake_result(9.0, 1.30, 0.0, None, 1), fake_result(9.2, 1.30, 0.0, None, 1)],
               "deep ensemble K=4": [fake_result(8.9, 1.3, 0.1, 0.2), fake_result(8.9, 1.3, 0.1, 0.3)],
               "renyi K=4 a=1": [fake_result(8.6, 1.25, 0.3, 0.6), fake_result(8.8, 1.27, 0.3, 0.8)],
               "latent classes K=4 (EM)": [fake_result(8.7, 1.36, 0.4, 0.9), fake_result(8.7, 1.36, 0.4, 0.9)]}
    checks = {target: (measured, verdict) for target, measured, verdict in target_checks(methods, 4)}
    # vs one adapter: gap 9.1 - 8.7 = 0.4 > 2 x max(std 0.1414, 0.1414) = 0.283; vs the deep ensemble 0.2 < 0.283
    assert checks["joint NLL below LoRA r by > 2 seed std"] == ("8.700 vs 9.100: gap +0.400, two seed std 0.283",
                                                                 "met")
    assert checks["joint NLL below deep ensemble K=4 by > 2 seed std"][1] == "not met"
    assert checks["joint NLL <= latent classes K=4 (EM)"][1] == "met"  # 8.7 <= 8.7
    assert checks["k=3 steering NLL below LoRA r with the same 3 answers in context"][1] == "met"
    assert checks["NMI with party >= latent classes K=4 (EM)"] == ("0.300 vs 0.400", "not met")
    assert checks["per-item MI ~ D/R JS: Spearman >= 0.5, the deep ensemble's < 0.5"] == ("0.70 vs 0.25", "met")
