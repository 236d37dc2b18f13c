"""The MLflow pyfunc model, logged "from code": nothing pickled, weights as safetensors.

MLflow stores this file beside the model and runs it at load time; the bundle (weights,
spec with classes and preprocessing, thresholds) travels as a plain artifact folder and
the opensig package as the model's code, so `mlflow.pyfunc.load_model` works anywhere
torch and timm are installed.

Input: a DataFrame with an ``image`` column (raw bytes; base64 strings in a JSON request
to ``mlflow models serve``, which decodes the signature's ``binary`` column) or a ``path``
column (image files, read only below ``$OPENSIG_SERVE_ROOT``: :mod:`opensig.serving`).
Output: one row per image with ``label`` (a class or ``unknown``),
``score``, one ``score_<class>`` column per class and ``error`` (empty when the image was
read); with the param ``multi_label`` true, also ``labels``: every class past its
threshold. With ``$OPENSIG_PREDICTION_LOG`` set, or a ``monitor.json`` naming a log_dir in
the bundle (register writes it), every answer is also appended to the prediction log
(:mod:`opensig.monitoring.log`). An image that failed has ``None`` as its label and
scores, not NaN: the scoring server writes NaN into its JSON answer as a bare ``NaN``,
which JSON parsers reject.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import pandas as pd
import torch

from opensig.model import confine
from opensig.monitoring.log import PredictionLog, served_identity, served_log_dir
from opensig.predict import Bundle
from opensig.serving import refused_paths, serve_roots
from opensig.spark_worker import task_cpus, worker_bundle
from opensig.tracking.model_uri import BUNDLE_DIR

log = logging.getLogger(__name__)


class OpensigModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        bundle_dir = confine(Path(context.artifacts[BUNDLE_DIR]))
        self.log = None
        self.roots = serve_roots()  # read once, at start: what path rows may read
        cores = task_cpus()
        if cores is not None:  # a Spark task: its cores, the bundle its Python worker loaded
            torch.set_num_threads(cores)  # before, and no log (`--log` writes it, per partition)
            self.bundle = worker_bundle(bundle_dir)
            return
        self.bundle = Bundle.load(bundle_dir)
        if log_dir := served_log_dir(bundle_dir):
            self.log = PredictionLog(log_dir, *served_identity(bundle_dir))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        if "image" in model_input.columns:
            sources = list(model_input["image"])
            names = [f"image[{i}]" for i in range(len(sources))]
        elif "path" in model_input.columns:
            sources = names = [str(p) for p in model_input["path"]]
            if reason := refused_paths(sources, self.roots):  # the HTTP 400, as below
                raise mlflow.exceptions.MlflowException.invalid_parameter_value(reason)
        else:  # MLflow's invalid-parameter error: the server answers 400 with this message
            # MLflow drops the columns the signature does not declare before this point, so
            # the request's own column names cannot be quoted back
            raise mlflow.exceptions.MlflowException.invalid_parameter_value(
                "input needs a 'path' column (image files) or an 'image' column (bytes); the "
                "request had neither (other columns are dropped: the model declares only "
                "these two)"
            )
        multi_label = bool((params or {}).get("multi_label", False))
        frame = self.bundle.predict(sources, names=names, progress=False, multi_label=multi_label)
        if self.log is not None:  # each worker process writes its own files
            try:
                self.log.append(frame, sources)
            except Exception:  # a full disk must not stop the answers: say so in the server log
                log.exception(
                    "prediction log %s: %d rows NOT logged (answers served all the same)",
                    self.log.root,
                    len(frame),
                )
        if (frame["error"] != "").any():  # None, not NaN: the HTTP answer must be JSON
            frame = frame.astype(object).where(frame.notna(), None)
        return frame


mlflow.models.set_model(OpensigModel())
