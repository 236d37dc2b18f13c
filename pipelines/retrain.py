"""Scheduled retraining: the Prefect flow `opensig.retrain.retrain`, runnable from here.

    python pipelines/retrain.py                          # once, now, no server needed
    python pipelines/retrain.py --force                  # rerun every stage
    python pipelines/retrain.py --serve                  # on retrain.cron from params.yaml
    python pipelines/retrain.py --serve --cron "0 3 * * *" --timezone Europe/Paris

Serving needs a Prefect server (`make prefect-server`) and PREFECT_API_URL pointing at it.
The same options as `opensig retrain`; prefect.yaml deploys `retrain` to a work pool.
"""

from __future__ import annotations

import sys

from opensig.retrain import retrain

__all__ = ["retrain"]

if __name__ == "__main__":
    from opensig.cli import app

    app(["retrain", *sys.argv[1:]], prog_name="pipelines/retrain.py")
