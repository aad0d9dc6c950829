"""The documentation's generated Configuration keys page: its YAML comment reader, and that it lists every key
each command composes (so the page cannot silently drop keys when conf/ changes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def config_reference():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "docs" / "_ext" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_comment_reader_takes_trailing_block_and_continued_comments(config_reference, tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(
        "# The file's header.\n"
        "defaults:\n"
        "  - _self_   # not a key\n"
        "\n"
        "out: 'a#b.h5'   # the output # with a hash\n"
        "# Shape noise, off by default.\n"
        "noise:\n"
        "  sigma_e: null   # per component\n"
        "                  # (continued)\n"
        "  n_gal: 30.0\n"
        "hydra:\n"
        "  run: {dir: .}   # never listed\n"
    )
    header, comments = config_reference.parse_comments(path)
    assert header == "The file's header."
    assert comments == {
        "out": "the output # with a hash",
        "noise": "Shape noise, off by default.",
        "noise.sigma_e": "per component (continued)",
    }


def test_the_page_lists_every_key_of_every_command(config_reference):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = ROOT / "conf"
    page = config_reference.render(conf)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        for name in config_reference.COMMANDS:
            assert f"### `{name}`" in page
            cfg = OmegaConf.to_container(compose(config_name=name), resolve=False)
            cfg.pop("hydra", None)
            for key, _, section in config_reference._flatten(cfg):
                if not section:
                    assert f"| `{key}` |" in page, f"{name}: {key} missing from the page"
    for experiment in (conf / "experiment").glob("*.yaml"):
        assert f"`+experiment={experiment.stem}`" in page
