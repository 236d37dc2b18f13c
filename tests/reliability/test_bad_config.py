"""Bad params fail before any work starts, naming the key: through the real CLI."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from opensig.cli import app

CASES = {
    "unknown key": ({"train": {"epochz": 3}}, "train.epochz: unknown key"),
    "wrong type": ({"train": {"batch_size": "big"}}, "train.batch_size"),
    "fractions over 1": (
        {"data": {"val_fraction": 0.6, "test_fraction": 0.5}},
        "data.val_fraction + data.test_fraction must be below 1",
    ),
    "negative epochs": ({"train": {"epochs": -2}}, "train.epochs"),
    "unknown backbone": (
        {"model": {"backbone": "resnet181"}},
        "model.backbone: Value error, 'resnet181' is not a timm model; did you mean resnet18",
    ),
    "missing pretrained file": (
        {"model": {"pretrained_file": "weights/nope.safetensors"}},
        "model.pretrained_file",
    ),
    "bomb limit above Pillow's": ({"data": {"max_image_pixels": 10**9}}, "data.max_image_pixels"),
}


@pytest.mark.parametrize("stage", ["ingest", "train"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_params_fail_before_work_naming_the_key(
    project: Path, case: str, stage: str, caplog
) -> None:
    override, message = CASES[case]
    params = yaml.safe_load(Path("params.yaml").read_text())
    for section, values in override.items():
        params[section].update(values)
    Path("params.yaml").write_text(yaml.safe_dump(params))

    with caplog.at_level(logging.ERROR):
        result = CliRunner().invoke(app, [stage])
    assert result.exit_code == 2
    assert message in caplog.text
    assert "params.yaml" in caplog.text
    assert not Path("artifacts").exists() and not Path("reports").exists()  # no work done


def test_broken_yaml_names_the_file_and_line(project: Path, caplog) -> None:
    lines = Path("params.yaml").read_text().splitlines()
    at = lines.index("train:") + 2  # a key indented one space too far, as a typo does
    lines[at] = " " + lines[at]
    Path("params.yaml").write_text("\n".join(lines) + "\n")

    with caplog.at_level(logging.ERROR):
        result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 2
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert line.startswith(f"train failed: params.yaml, line {at + 1}, column ")
    assert "not valid YAML" in line and "<unicode string>" not in line
    assert not Path("artifacts").exists()
