"""renyi_lora.data.sources: data files, datasets objects, saved dataset folders, data-file folders, hub ids, lists."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from renyi_lora.data.records import DataError
from renyi_lora.data.sources import check_source, read_source, source_kind

datasets = pytest.importorskip("datasets")

ROWS = [
    {"prompt": "a", "completion": "b", "group": None},
    {"prompt": "c", "completion": "d", "group": "g"},
    {"prompt": "e", "completion": "f", "group": None},
]
STRIPPED = [(1, {"prompt": "a", "completion": "b"}), (2, {"prompt": "c", "completion": "d", "group": "g"}),
            (3, {"prompt": "e", "completion": "f"})]


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    """Offline, and load_dataset's cache (prepared Arrow files) under tmp_path, not in ~/.cache."""
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    datasets.disable_progress_bars()


def one_line_error(source, *args, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        read_source(source, *args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def test_data_file_delegates_to_read_records(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "x"}\n\n{"text": "y"}\n', encoding="utf-8")
    assert read_source(path) == (str(path), "line", [(1, {"text": "x"}), (3, {"text": "y"})])
    assert read_source(str(path)) == (str(path), "line", [(1, {"text": "x"}), (3, {"text": "y"})])
    assert check_source(path) == "file"
    # A missing data file is a missing file, not a hub id.
    missing = str(tmp_path / "nope.jsonl")
    assert f"{missing}: file not found" in one_line_error(missing)
    with pytest.raises(DataError, match="file not found"):
        check_source(missing)
    assert "nope.jsonl: file not found" in one_line_error("nope.jsonl")


def test_list_of_dicts():
    assert read_source([{"text": "x"}, {"text": "y", "id": None}]) == (
        "list", "item", [(1, {"text": "x"}), (2, {"text": "y", "id": None})])
    assert "list, item 2: expected a dict (one record), got str 'oops'" in one_line_error([{"text": "x"}, "oops"])
    assert "list: no records (the list is empty)" in one_line_error([])
    assert check_source([]) == "list"


def test_dataset_object_rows_numbered_from_1_and_nulls_dropped():
    assert read_source(datasets.Dataset.from_list(ROWS)) == ("Dataset", "row", STRIPPED)
    named = datasets.Dataset.from_list(ROWS, info=datasets.DatasetInfo(dataset_name="mine"), split="train")
    assert read_source(named) == ("mine(train)", "row", STRIPPED)
    # The Arrow rows themselves: a torch format and a selection are followed as data, not as tensors.
    picked = datasets.Dataset.from_list(ROWS).with_format("torch").select([2, 0])
    assert read_source(picked)[2] == [(1, {"prompt": "e", "completion": "f"}), (2, {"prompt": "a", "completion": "b"})]
    assert source_kind(picked) == "dataset"


def test_empty_dataset_is_an_error():
    empty = datasets.Dataset.from_dict({"text": []})
    assert "Dataset: no records (the dataset is empty); expected at least one record" in one_line_error(empty)


def test_iterable_dataset():
    streamed = datasets.Dataset.from_list(ROWS).to_iterable_dataset()
    assert read_source(streamed) == ("Dataset", "row", STRIPPED)


def test_dataset_dict_split_choice():
    test_rows = [{"text": "t1"}, {"text": "t2", "group": None}]
    both = datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS), test=datasets.Dataset.from_list(test_rows))
    assert read_source(both) == ("DatasetDict(train)", "row", STRIPPED)
    assert read_source(both, split="test") == ("DatasetDict(test)", "row", [(1, {"text": "t1"}), (2, {"text": "t2"})])
    assert ("DatasetDict: no split 'validation'; available splits: train, test"
            in one_line_error(both, split="validation"))
    no_train = datasets.DatasetDict(dev=datasets.Dataset.from_list(test_rows), test=both["test"])
    assert "DatasetDict: no 'train' split; choose a split (available: dev, test)" in one_line_error(no_train)
    assert check_source(both, "test") == "dataset-dict"
    with pytest.raises(DataError, match="available: dev, test"):
        check_source(no_train)


def test_saved_dataset_folder(tmp_path):
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
    assert source_kind(folder) == "saved-dataset"
    assert read_source(folder) == (str(folder), "row", STRIPPED)
    assert read_source(str(folder)) == (str(folder), "row", STRIPPED)


def test_saved_dataset_dict_folder(tmp_path):
    folder = tmp_path / "saved-dict"
    test_rows = [{"prompt": "p", "completion": "q", "group": None}]
    datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS),
                         test=datasets.Dataset.from_list(test_rows)).save_to_disk(str(folder))
    assert check_source(folder) == "saved-dataset-dict"
    assert read_source(folder) == (f"{folder}(train)", "row", STRIPPED)
    assert read_source(folder, split="test") == (f"{folder}(test)", "row", [(1, {"prompt": "p", "completion": "q"})])
    assert f"{folder}: no split 'dev'; available splits: train, test" in one_line_error(folder, split="dev")
    with pytest.raises(DataError, match="no split 'dev'; available splits: train, test"):
        check_source(folder, "dev")  # from dataset_dict.json, without importing datasets


def test_folder_of_data_files_goes_through_load_dataset(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS)
    write_jsonl(folder / "test.jsonl", [{"prompt": "x", "completion": "y"}, {"prompt": "z", "completion": "w"}])
    assert check_source(folder) == "folder"
    assert read_source(folder) == (f"{folder}(train)", "row", STRIPPED)  # the null groups: absent
    test = [(1, {"prompt": "x", "completion": "y"}), (2, {"prompt": "z", "completion": "w"})]
    assert read_source(str(folder), split="test") == (f"{folder}(test)", "row", test)
    assert read_source(folder, split="test[1:]") == (f"{folder}(test[1:])", "row", [(1, test[1][1])])
    message = one_line_error(folder, split="validation")
    assert f"{folder}: could not be loaded as a dataset folder (load_dataset" in message
    assert "ValueError: Unknown split \"validation\". Should be one of ['train', 'test']" in message
    only_test = tmp_path / "only-test"
    only_test.mkdir()
    write_jsonl(only_test / "test.jsonl", ROWS)
    assert f"{only_test}: no 'train' split; choose a split (available: test)" in one_line_error(only_test)


def test_hub_id_offline_is_one_clear_line():
    assert source_kind("trl-lib/Capybara") == "hub"
    assert check_source("trl-lib/Capybara") == "hub"  # not loaded yet
    message = one_line_error("trl-lib/Capybara", split="train", config="default")
    assert message.startswith("trl-lib/Capybara: could not be loaded as a hub dataset "
                              "(not a local file or folder either; offline mode is on")
    assert "ConnectionError: Couldn't reach 'trl-lib/Capybara' on the Hub (OfflineModeIsEnabled)" in message
    assert "renyi-lora-no-such-dataset: could not be loaded as a hub dataset" in one_line_error(
        "renyi-lora-no-such-dataset")


def test_unsupported_sources():
    assert "unsupported data source int" in one_line_error(42)
    assert "unsupported data source str" in one_line_error("  ")
    message = one_line_error("no such thing here!")
    assert "no such thing here!: not found; expected a .jsonl, .json or .parquet file, a dataset folder" in message


def test_reading_files_does_not_import_datasets(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "x"}\n', encoding="utf-8")
    code = ("import sys; from renyi_lora.data.sources import check_source, read_source; "
            f"assert read_source({str(path)!r})[2] == [(1, {{'text': 'x'}})]; check_source({str(path)!r}); "
            "check_source('trl-lib/Capybara'); assert 'datasets' not in sys.modules, 'datasets imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
