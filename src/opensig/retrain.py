"""Scheduled retraining as a Prefect flow: new images in, better model out, worse never promoted.

The flow only orchestrates: DVC knows what changed and what to rerun, and the register stage
is the one promotion gate (challenger vs champion on the current test split, `promote:` in
params.yaml), so a plain `dvc repro` and a scheduled run decide exactly alike. Steps:

1. detect change: `dvc status` (data vs data.dvc, params and code vs dvc.lock); nothing
   changed and not forced -> finish early, Completed("nothing to do");
2. version the data: `dvc add data`;
3. reproduce: `dvc repro`, its output streamed into the Prefect log;
4. report the register stage's decision as a Markdown artifact (shown in the Prefect UI);
   the decision, both metrics and the reason are already tags on the model version;
5. optionally `dvc push`, and a git commit of data.dvc, dvc.lock and the outputs git keeps
   (the reports DVC does not cache), so a commit's reports agree with its dvc.lock
   (`retrain:` in params.yaml).

A failing step fails the flow with that step's message. The champion alias moves only at
the very end of the register stage, so a failure anywhere leaves it where it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.events import DeploymentEventTrigger
from prefect.states import Completed, State

from opensig.config import ConfigError, RetrainConfig, load_config
from opensig.events import DATA_ADDED, project_resource
from opensig.io import inside
from opensig.prefect_env import configure

configure()

FLOW_NAME = "opensig-retrain"
ARTIFACT_KEY = "opensig-promotion"
# DVC's messages when another dvc command holds the repository (its short lock while it
# reads the project) or a stage's files (the read/write lock held while a stage runs)
LOCK_BUSY = ("Unable to acquire lock", "is busy, it is being blocked by")


class StepFailed(RuntimeError):
    """A command of the flow exited non-zero; the message carries its output's tail."""


class RepoBusy(StepFailed):
    """Another dvc command holds the repository lock: worth retrying later."""


def _tool_env() -> dict[str, str]:
    """PATH with this interpreter's folder first: `dvc` and the stages' `opensig` resolve to
    the same installation as the flow, even under a worker started without the venv."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_command(args: list[str], cwd: Path, log_lines: bool = True) -> str:
    """Run a command in ``cwd``, streaming each output line to the run log; raise on failure."""
    logger = get_run_logger()
    lines: list[str] = []
    with subprocess.Popen(
        args,
        cwd=cwd,
        env=_tool_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            lines.append(line)
            if log_lines and line:
                logger.info("%s", line)
    output = "\n".join(lines)
    if proc.returncode != 0:
        error = RepoBusy if any(message in output for message in LOCK_BUSY) else StepFailed
        raise error(
            f"`{' '.join(args)}` failed in {cwd} (exit {proc.returncode}):\n"
            + "\n".join(lines[-40:])
        )
    return output


def _retry_if_busy(task: Any, task_run: Any, state: State) -> bool:
    """Retry only a lock held by another dvc command; a failing stage fails the same again."""
    return isinstance(state.data, RepoBusy)


DVC_RETRY = {"retries": 3, "retry_delay_seconds": 30, "retry_condition_fn": _retry_if_busy}


def describe_changes(status: dict[str, list]) -> list[str]:
    """`dvc status --json` -> one line per changed stage or .dvc file, naming the causes.

    A stage's own missing outputs and its deleted inputs (an upstream stage's outputs) are
    consequences, not causes: they are summed up as "outputs stale" so the lines point at
    what a person changed (data, a param, a source file, the command).
    """
    lines = []
    for target, entries in sorted(status.items()):
        causes = []
        for entry in entries:
            if isinstance(entry, str):  # e.g. "changed command", "always changed"
                causes.append(entry)
                continue
            for kind, items in entry.items():
                for path, what in items.items():
                    if isinstance(what, dict):  # params: {"train.epochs": "modified"}
                        causes += [f"param {k} {v}" for k, v in what.items()]
                    elif target.endswith(".dvc") or (kind == "changed deps" and what != "deleted"):
                        causes.append(f"{path} {what}")
        lines.append(f"{target}: {', '.join(causes) or 'outputs stale'}")
    return lines


@task(name="detect change", **DVC_RETRY)
def detect_changes(project: Path) -> dict[str, list]:
    """What differs from data.dvc and dvc.lock (data, params, code); empty when up to date."""
    output = run_command(["dvc", "status", "--json"], project, log_lines=False)
    # The JSON is one line; anything else on the stream is a DVC warning.
    status = json.loads(next((ln for ln in output.splitlines()[::-1] if ln[:1] == "{"), "{}"))
    if not (project / "dvc.lock").is_file():
        get_run_logger().info("no dvc.lock yet: first run, every stage runs")
    for line in describe_changes(status) or ["nothing changed since the last run"]:
        get_run_logger().info("%s", line)
    return status


@task(name="version data", **DVC_RETRY)
def version_data(project: Path, data: Path) -> None:
    """`dvc add` records the data's current content hash in data.dvc and caches new files."""
    run_command(["dvc", "add", str(data)], project)


@task(name="reproduce", **DVC_RETRY)
def reproduce(project: Path, force: bool) -> None:
    """`dvc repro`: only stages whose inputs changed run; register applies the gate."""
    run_command(["dvc", "repro", *(["--force"] if force else [])], project)


@task(name="push", retries=3, retry_delay_seconds=[10, 60, 300])
def push(project: Path) -> None:
    """Send data and outputs to the DVC remote; retried because remotes are networks."""
    if not run_command(["dvc", "remote", "list"], project, log_lines=False).strip():
        raise ConfigError(
            f"{project / 'params.yaml'}: retrain.push is true but the project has no DVC "
            "remote: add one with `dvc remote add -d <name> <url>` or set retrain.push: false"
        )
    run_command(["dvc", "push"], project)


def outputs_in_git(project: Path) -> list[Path]:
    """The stage outputs dvc.lock records that git keeps: those DVC does not cache (reports,
    plot CSVs), tracked or new. DVC git-ignores the outputs it caches, so git leaves them out.
    """
    lock = project / "dvc.lock"
    if not lock.is_file():
        return []
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    outs = [out["path"] for stage in stages.values() for out in stage.get("outs", [])]
    if not outs:
        return []
    listed = run_command(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *outs],
        project,
        log_lines=False,
    )
    return [project / name for name in dict.fromkeys(listed.split("\0")) if name]


@task(name="commit")
def commit(project: Path, files: list[Path], message: str) -> None:
    """Record the given files that changed in git, and nothing else the user staged.
    Files outside the project (data.root elsewhere) are not the project's to commit."""
    below = [inside(f, project) for f in files if f.is_file()]
    paths = [str(path) for path in below if path is not None]
    if not paths:  # `git commit --` with no path would commit whatever is staged
        return
    changed = run_command(["git", "status", "--porcelain", "--", *paths], project, False)
    if changed.strip():
        run_command(["git", "add", "--", *paths], project)
        run_command(["git", "commit", "-q", "-m", message, "--", *paths], project)


def read_registration(project: Path) -> dict | None:
    path = project / "reports" / "registered.json"
    return json.loads(path.read_text()) if path.is_file() else None


def promotion_markdown(registration: dict, changes: list[str]) -> str:
    """The register stage's decision as a table: what a reviewer opens in the Prefect UI."""
    c = registration["comparison"]

    def fmt(value: Any) -> str:
        return (
            "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
        )

    rows = [
        "| model | version | " + c["metric"] + " |",
        "| --- | --- | --- |",
        f"| challenger (new) | {registration['version']} | {fmt(c.get('challenger_value'))} |",
    ]
    if "champion_version" in c:
        rows.append(
            f"| champion (before) | {c['champion_version']} | {fmt(c.get('champion_value'))} |"
        )
    body = [
        f"# {registration['name']}: {c['decision']}",
        "",
        *rows,
        "",
        f"Reason: {c['reason']} (metric `{c['metric']}`, min_delta {c['min_delta']}, "
        "both on the current test split).",
        "",
    ]
    if c.get("guards"):
        body += ["Guards (promote.guard: no drop beyond the allowed one):", ""]
        body += [f"- {line}" for line in c["guards"]] + [""]
    if c.get("class_sets") == "differ":
        body += [
            "The class sets differ, and both models were judged on today's classes: the "
            f"champion lacks {', '.join(c['champion_lacks']) or 'none'}, and has "
            f"{', '.join(c['champion_extra']) or 'none'} that today's data lacks.",
            "",
        ]
    body += [
        f"Aliases of version {registration['version']}: {', '.join(registration['aliases'])}. "
        f"MLflow run `{registration['run_id']}`.",
    ]
    if changes:
        body += ["", "What changed:", "", *[f"- {line}" for line in changes]]
    return "\n".join(body)


def check_schedule(settings: RetrainConfig, params: Path, key: str = "retrain.cron") -> None:
    """The full cron check (Prefect's own parser), before anything is served; ``key`` names
    the setting the cron line came from."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=settings.cron, timezone=settings.timezone)
    except ValidationError as err:
        reason = err.errors()[0]["msg"]
        raise ConfigError(f"{params}: {key} {settings.cron!r}: {reason}") from None


@flow(name=FLOW_NAME)
def retrain(project: str = ".", force: bool = False) -> dict | State:
    """Bring the model in ``project`` up to date with its data, params and code."""
    logger = get_run_logger()
    root = Path(project).resolve()
    cfg = load_config(root / "params.yaml")  # a bad params file fails before any work
    status = detect_changes(root)
    changes = describe_changes(status)
    if not status and not force:
        summary = {
            "action": "nothing to do",
            "changes": [],
            "registration": read_registration(root),
        }
        return Completed(
            message="nothing to do: data, params and code match dvc.lock", data=summary
        )

    before = read_registration(root)
    data = cfg.data.root if cfg.data.root.is_absolute() else root / cfg.data.root
    version_data(root, data)
    reproduce(root, force)
    after = read_registration(root)
    if after is None or (before is not None and after["run_id"] == before["run_id"]):
        # e.g. a tune change that gave the same thresholds: DVC had nothing to re-register.
        action = "no new model"
        logger.info("the pipeline ran but produced no new model version")
    else:
        action = after["comparison"]["decision"]
        create_markdown_artifact(
            promotion_markdown(after, changes),
            key=ARTIFACT_KEY,
            description=f"{after['name']} version {after['version']}: {action}",
        )
        logger.info("model %s version %s: %s", after["name"], after["version"], action)
    if cfg.retrain.push:
        push(root)
    if cfg.retrain.commit:
        files = [data.with_name(f"{data.name}.dvc"), root / "dvc.lock", *outputs_in_git(root)]
        message = f"opensig retrain: {action}" + (
            f" ({after['name']} version {after['version']})" if after else ""
        )
        commit(root, files, message)
    return {"action": action, "changes": changes, "registration": after}


def data_added_trigger(project: Path | str) -> DeploymentEventTrigger:
    """Prefect's own automation: an `opensig.data.added` event about this project (sent by
    `opensig review import`) starts a run, as the cron does; nothing of ours polls."""
    return DeploymentEventTrigger(
        name="opensig data added",
        expect={DATA_ADDED},
        match={"prefect.resource.id": project_resource(project)},
    )


def serve(project: str, cron: str, timezone: str) -> None:
    """Serve the flow on a schedule and on new data; runs start only while a Prefect server
    is reachable (`prefect server start`, PREFECT_API_URL). One run at a time: DVC holds one
    repo lock."""
    from prefect.schedules import Cron

    retrain.serve(
        name="local-schedule",  # shows as opensig-retrain/local-schedule
        schedules=[Cron(cron, timezone=timezone)],
        triggers=[data_added_trigger(project)],
        parameters={"project": str(Path(project).resolve())},
        limit=1,
    )
