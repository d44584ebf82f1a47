"""Where training data comes from: a data file, a ``datasets`` object, a saved dataset folder, a hub id or a list.

``read_source`` turns each into ``(source_name, unit, [(number, record), ...])``, the shape of
``renyi_lora.data.records.read_records`` plus the name and unit that error messages (``Location``) need:

- a ``.jsonl`` / ``.json`` / ``.parquet`` file: ``read_records`` (unit ``line`` / ``item`` / ``row``);
- a ``datasets.Dataset`` (or ``IterableDataset``): unit ``row``, numbered from 1, named
  ``Dataset(split)`` (``info.dataset_name`` instead of ``Dataset`` when set);
- a ``datasets.DatasetDict``: one split of it, ``split=`` (default ``"train"`` when there is one);
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``state.json`` and
  ``dataset_info.json``, or ``dataset_dict.json``): ``datasets.load_from_disk``;
- any other folder (e.g. ``train.jsonl`` and ``test.jsonl``): ``datasets.load_dataset(folder)``;
- a string that is no local path and looks like a hub id (``owner/name`` or ``name``):
  ``datasets.load_dataset(id, name=config, split=split)``; failure (offline, network, not found) is one
  ``DataError`` line naming the id;
- a ``list`` of dicts: unit ``item``, numbered from 1, named ``list``.

As in the Parquet reader, a null cell of an Arrow-backed dataset is an absent field. ``datasets`` is
imported only for sources that need it; ``datasets`` objects are recognised only if it is already imported.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

from renyi_lora.data.records import (
    FORMAT_FIELDS,
    KNOWN_FIELDS,
    RECORD_UNITS,
    DataError,
    Location,
    check_data_file,
    detect_format,
    read_records,
    without_nulls,
)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
SAVED_DATASET = ("dataset_info.json", "state.json")  # both, as datasets.load_from_disk requires
SAVED_DATASET_DICT = "dataset_dict.json"
INSTALL = "pip install 'renyi-lora[datasets]'"


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _datasets_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(dataset classes, dataset-dict classes); empty if ``datasets`` is not imported (then nothing is one)."""
    module = sys.modules.get("datasets")
    if module is None:
        return (), ()
    return (module.Dataset, module.IterableDataset), (module.DatasetDict, module.IterableDatasetDict)


def _import_datasets(what: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{what}: reading it needs the 'datasets' package; install it: {INSTALL}") from None
    return datasets


def source_kind(source: Any) -> str:
    """``"file"``, ``"saved-dataset"``, ``"saved-dataset-dict"``, ``"folder"``, ``"hub"``, ``"dataset"``,
    ``"dataset-dict"`` or ``"list"``; ``DataError`` for anything else. Imports nothing."""
    dataset_types, dict_types = _datasets_types()
    if dataset_types and isinstance(source, dataset_types):
        return "dataset"
    if dict_types and isinstance(source, dict_types):
        return "dataset-dict"
    if isinstance(source, list):
        return "list"
    if not isinstance(source, (str, Path)) or not str(source).strip():
        raise DataError(f"unsupported data source {type(source).__name__} {str(source)[:60]!r}; expected a data "
                        "file, a dataset folder, a hub dataset id, a datasets.Dataset / DatasetDict or a list of dicts")
    path = Path(source)
    if path.is_dir():
        if all((path / name).is_file() for name in SAVED_DATASET):
            return "saved-dataset"
        return "saved-dataset-dict" if (path / SAVED_DATASET_DICT).is_file() else "folder"
    if path.exists() or isinstance(source, Path) or path.suffix.lower() in RECORD_UNITS:
        return "file"  # read_records names a missing file or a wrong extension
    if HUB_ID.match(source):
        return "hub"
    raise DataError(f"{source}: not found; expected a .jsonl, .json or .parquet file, a dataset folder or a hub "
                    "dataset id ('owner/name')")


def _pick_split(name: str, splits: list[str], split: str | None) -> str:
    if split is None:
        if "train" in splits:
            return "train"
        raise DataError(f"{name}: no 'train' split; choose a split (available: {', '.join(splits)})")
    if split not in splits:
        raise DataError(f"{name}: no split {split!r}; available splits: {', '.join(splits) or 'none'}")
    return split


def _dataset_records(dataset: Any, name: str, split: str | None) -> tuple[str, str, list[tuple[int, dict]]]:
    """The rows of a ``Dataset`` / ``IterableDataset`` (null cells dropped), with the source's name."""
    if hasattr(dataset, "to_list"):
        rows = dataset.to_list()  # the Arrow table itself: ignores with_format(), follows select()/shuffle()
    else:
        rows = list(dataset)  # an IterableDataset: streams every row
    split = split or getattr(dataset, "split", None)
    source = f"{name}({split})" if split else name
    records = without_nulls(rows)
    if not records:
        raise DataError(f"{source}: no records (the dataset is empty); expected at least one record")
    return source, "row", records


def _from_loaded(loaded: Any, name: str, split: str | None) -> tuple[str, str, list[tuple[int, dict]]]:
    """Records of a loaded ``Dataset`` or of one split of a ``DatasetDict`` (a dict of datasets)."""
    if isinstance(loaded, dict):
        chosen = _pick_split(name, list(loaded), split)
        return _dataset_records(loaded[chosen], name, chosen)
    return _dataset_records(loaded, name, split)


def _dataset_name(dataset: Any) -> str:
    info = getattr(dataset, "info", None)
    return getattr(info, "dataset_name", None) or "Dataset"


def _load_dataset(source: str, what: str, split: str | None, config: str | None) -> Any:
    datasets = _import_datasets(source)
    try:
        # Without a split, every split is loaded and _pick_split chooses (and lists them if it cannot).
        return datasets.load_dataset(source, name=config, split=split)
    except Exception as error:
        if getattr(datasets.config, "HF_HUB_OFFLINE", False):
            what += "; offline mode is on, so only datasets already in the local cache load"
        raise DataError(f"{source}: could not be loaded as {what}): {_first_line(error)}") from None


def read_source(source: Any, split: str | None = None,
                config: str | None = None) -> tuple[str, str, list[tuple[int, dict]]]:
    """``(source_name, unit, [(number, record), ...])`` for any source in the module docstring.

    ``split`` chooses a split of a dataset dict (default ``"train"``; ``DataError`` lists the splits if it is
    missing), or is passed to ``load_dataset`` (slices such as ``"train[:100]"`` work there). ``config`` is a
    hub dataset's configuration. ``split`` and ``config`` do not apply to files, lists and single datasets.
    """
    kind = source_kind(source)
    if kind == "file":
        return str(source), check_data_file(source), read_records(source)
    if kind == "list":
        for number, item in enumerate(source, start=1):
            if not isinstance(item, dict):
                raise Location("list", "item", number).error(None, f"expected a dict (one record), got "
                                                                   f"{type(item).__name__} {str(item)[:40]!r}")
        if not source:
            raise DataError("list: no records (the list is empty); expected at least one record")
        return "list", "item", list(enumerate(source, start=1))
    if kind == "dataset":
        return _dataset_records(source, _dataset_name(source), None)
    if kind == "dataset-dict":
        return _from_loaded(source, "DatasetDict", split)
    if kind in ("saved-dataset", "saved-dataset-dict"):
        datasets = _import_datasets(str(source))
        try:
            loaded = datasets.load_from_disk(str(source))
        except Exception as error:
            raise DataError(f"{source}: not a readable saved dataset ({_first_line(error)})") from None
        return _from_loaded(loaded, str(source), split)
    what = "a dataset folder (load_dataset" if kind == "folder" else "a hub dataset (not a local file or folder either"
    if split is None:
        return _from_loaded(_load_dataset(str(source), what, None, config), str(source), None)
    return _dataset_records(_load_dataset(str(source), what, split, config), str(source), split)


def check_source(source: Any, split: str | None = None, config: str | None = None) -> str:
    """Cheap checks for CLI argument validation before a model is loaded; returns ``source_kind(source)``.

    Files must exist with a known extension, a saved dataset dict must hold ``split`` (default ``"train"``);
    hub ids and other folders are only checked when read (that needs ``datasets`` and maybe the network).
    """
    kind = source_kind(source)
    if kind == "file":
        check_data_file(source)
    elif kind == "saved-dataset-dict":
        try:
            splits = json.loads((Path(source) / SAVED_DATASET_DICT).read_text(encoding="utf-8"))["splits"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DataError(f"{source}: not a readable saved dataset dict ({_first_line(error)})") from None
        _pick_split(str(source), list(splits), split)
    elif kind == "dataset-dict":
        _pick_split("DatasetDict", list(source), split)
    elif kind in ("folder", "hub") and importlib.util.find_spec("datasets") is None:
        raise DataError(f"{source}: reading it needs the 'datasets' package; install it: {INSTALL}")
    return kind


def read_typed_records(source: Any, kinds: tuple[str, ...], loader: str, split: str | None = None,
                       *, config: str | None = None) -> list[tuple[Location, str, dict]]:
    """Read ``source`` (``read_source``) and check every record's format: ``(location, format, record)`` triples.

    The first record decides the source's format, which must be one of ``kinds`` (``loader`` names the
    function for the error message).
    """
    source_name, unit, records = read_source(source, split, config)
    typed, file_format = [], None
    for number, record in records:
        where = Location(source_name, unit, number)
        # Without a telling field, the loader's first format is assumed (its missing field is named).
        default = kinds[0] if "prompt" in record or len(kinds) == 1 else None
        name = detect_format(record, where, file_format, default)
        if file_format is None and name not in kinds:
            fields = " or ".join("{" + ", ".join(FORMAT_FIELDS[kind]) + "}" for kind in kinds)
            telling = sorted(set(record) & KNOWN_FIELDS - {"prompt"})
            raise where.error(telling[0], f"records in the {name} format {list(FORMAT_FIELDS[name])} cannot be read by "
                              f"{loader}; expected {fields}")
        file_format = name
        typed.append((where, name, record))
    return typed
