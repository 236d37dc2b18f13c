"""MLflow, one room per job, so that a change in one never reruns a stage that does not use it.

- :mod:`~opensig.tracking.store`: the connection (tracking URI, bounded HTTP, reachability,
  errors as one redacted line);
- :mod:`~opensig.tracking.model_uri`: ``models:/`` and ``runs:/`` URIs (the one parser) and
  their download to a local bundle folder;
- :mod:`~opensig.tracking.runs`: the training run and run logging (params, metrics, pictures);
- :mod:`~opensig.tracking.packaging`: a bundle as an MLflow pyfunc model;
- :mod:`~opensig.tracking.promotion`: registration and the champion/challenger gate.

train and tune use only the first three; packaging, promotion and the served model
(:mod:`opensig.pyfunc_model`) are register's.
"""
