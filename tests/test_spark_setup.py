"""What `--engine spark` checks before Spark starts: pyspark and Java there (one line each,
saying how), predict's local-only options refused, and paths given back as the files' own."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from opensig.cli import app
from opensig.spark import local_path, require_spark


@pytest.mark.parametrize(
    ("spark_path", "path"),
    [
        ("file:/data/a%20b.png", "/data/a b.png"),
        ("file:///data/a+b.png", "/data/a+b.png"),  # not a space: Spark's url_decode would say so
        ("s3a://bucket/cams/x.jpg", "s3a://bucket/cams/x.jpg"),
    ],
)
def test_spark_paths_are_given_back_as_the_files_own(spark_path: str, path: str) -> None:
    assert local_path(spark_path) == path


def test_missing_pyspark_is_one_line_saying_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pyspark", None)  # what `import pyspark` meets uninstalled
    with pytest.raises(RuntimeError, match=r"needs pyspark: pip install 'opensig\[spark\]'"):
        require_spark()


def test_missing_java_is_one_line_saying_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("pyspark")
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without java
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(RuntimeError, match=r"needs Java 17 or later .* openjdk-17-jre-headless"):
        require_spark()


@pytest.mark.parametrize(
    "option",
    [["--thresholds", "t.json"], ["--sort-into", "sorted"], ["--workers", "2"], ["--force"]],
)
def test_local_only_options_are_refused_with_spark(option: list[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["predict", str(tmp_path), "--model", "m", "--engine", "spark", *option]
    )
    assert result.exit_code == 2
    assert f"{option[0]}: --engine local only" in result.output


def test_spark_master_needs_the_spark_engine(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["predict", str(tmp_path), "--model", "m", "--spark-master", "local[2]"]
    )
    assert result.exit_code == 2 and "--spark-master goes with --engine spark" in result.output
