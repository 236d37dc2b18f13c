"""Prefect flow: retrain with `dvc repro` and report what the registry decided.

Run once:      python pipelines/retrain.py --once [--project PATH]
On a schedule: prefect server start   (and PREFECT_API_URL pointing at it), then
               python pipelines/retrain.py --cron "0 3 * * *"
DVC reruns only the stages whose inputs changed (new data in data/, edited params), so a
scheduled run with nothing new costs seconds; the register stage moves `champion` only
when the new model beats it on the current test split.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from prefect import flow, get_run_logger, task


@task
def dvc_repro(project: Path) -> str:
    """Run the pipeline; a failing stage fails the task with DVC's own message."""
    result = subprocess.run(["dvc", "repro"], cwd=project, capture_output=True, text=True)
    get_run_logger().info(result.stdout[-4000:])
    if result.returncode != 0:
        raise RuntimeError(f"dvc repro failed in {project}:\n{result.stderr[-4000:]}")
    return result.stdout


@task
def read_registration(project: Path) -> dict:
    return json.loads((project / "reports" / "registered.json").read_text())


@flow(name="opensig-retrain")
def retrain(project: str = ".") -> dict:
    """Bring the model up to date with the data and params in ``project``."""
    root = Path(project).resolve()
    dvc_repro(root)
    registration = read_registration(root)
    get_run_logger().info(
        "model %s version %s aliases %s",
        registration["name"],
        registration["version"],
        registration["aliases"],
    )
    return registration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=".", help="folder with dvc.yaml and params.yaml")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--once", action="store_true", help="run now, without a server")
    group.add_argument("--cron", help="serve on this schedule (needs a Prefect server)")
    args = parser.parse_args()
    if args.once:
        retrain(args.project)
    else:
        retrain.serve(name="opensig-retrain", cron=args.cron, parameters={"project": args.project})


if __name__ == "__main__":
    main()
