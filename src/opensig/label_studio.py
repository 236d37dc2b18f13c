"""Label Studio's formats: the labeling config, the tasks a review batch is labeled from, and
the JSON export its annotations come back in. Only the shape of Label Studio's files lives
here; what a label means, and the rules of the import, are review's.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import pandas as pd

from opensig.io import atomic_write, inside, write_json
from opensig.labels import UNKNOWN_LABEL

LABEL_STUDIO = "label-studio"  # tasks.json and config.xml, in the batch folder


def label_config(classes: list[str]) -> str:
    """A Label Studio labeling config: one choice among the classes and ``unknown``, plus a
    text field to name a new class (or ``unknown/<source>``)."""
    choices = "\n".join(
        f"    <Choice value={quoteattr(name)}/>" for name in [*classes, UNKNOWN_LABEL]
    )
    return (
        "<View>\n"
        '  <Image name="image" value="$image"/>\n'
        '  <Choices name="label" toName="image" choice="single" showInLine="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        '  <Header value="A new class? Its name (it wins over the choice):"/>\n'
        '  <TextArea name="new_class" toName="image" maxSubmissions="1" rows="1"/>\n'
        "</View>\n"
    )


def write_label_studio(batch: Path, listing: pd.DataFrame, classes: list[str], root: Path) -> Path:
    """``<batch>/label-studio/tasks.json`` (one task per copied image, pre-annotated with the
    prediction) and ``config.xml``. Images are served by Label Studio's local-files serving,
    with ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` set to ``root`` (the review folder)."""
    folder = batch / LABEL_STUDIO
    tasks = []
    for rec in listing[listing["file"] != ""].to_dict("records"):
        image = batch / rec["file"]
        served = inside(image, root, follow_links=True)
        if served is None:
            raise ValueError(
                f"{image} leads to {image.resolve()}, outside the review folder {root} that "
                "Label Studio serves: keep the batch's files inside it (no links out), or "
                "export the batch again"
            )
        tasks.append(
            {
                "data": {
                    "image": f"/data/local-files/?d={quote(served.as_posix())}",
                    "file": rec["file"],
                    "sha256": rec["sha256"],
                    "predicted_label": rec["predicted_label"],
                },
                "predictions": [
                    {
                        "model_version": "opensig",
                        "score": rec["score"],
                        "result": [
                            {
                                "from_name": "label",
                                "to_name": "image",
                                "type": "choices",
                                "value": {"choices": [rec["predicted_label"]]},
                            }
                        ],
                    }
                ],
            }
        )
    atomic_write(folder / "config.xml", lambda tmp: tmp.write_text(label_config(classes)))
    write_json(folder / "tasks.json", tasks)
    return folder / "tasks.json"


def read_annotations(export: Path) -> list[tuple[str, str, str | None]]:
    """(batch file, label text, sha256) per annotation of a Label Studio JSON export."""
    try:
        tasks = json.loads(Path(export).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{export}: not a Label Studio JSON export ({err})") from None
    if not isinstance(tasks, list):
        raise ValueError(f"{export}: not a Label Studio JSON export (a list of tasks)")
    found = []
    for task in tasks:
        data = task.get("data", {})
        if "file" not in data:
            raise ValueError(
                f"{export}: task {task.get('id')} has no data.file: import the tasks.json "
                "that `opensig review export --format label-studio` wrote"
            )
        for annotation in task.get("annotations", []):
            if annotation.get("was_cancelled"):
                continue
            results = {r.get("from_name"): r.get("value", {}) for r in annotation["result"]}
            text = " ".join(results.get("new_class", {}).get("text", [])).strip()
            choices = results.get("label", {}).get("choices", [])
            if text or choices:
                found.append((data["file"], text or choices[0], data.get("sha256")))
    return found
