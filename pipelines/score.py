"""The batch-scoring flow `opensig.score_flow.batch_score`, runnable from here.

    python pipelines/score.py                     # once, now, on score.inputs (no server needed)
    python pipelines/score.py photos/ s3://b/in/  # once, on these inputs
    python pipelines/score.py --serve             # on score.cron from params.yaml

Serving needs a Prefect server (`make prefect-server`) and PREFECT_API_URL pointing at it.
The same options as `opensig score-flow`; prefect.yaml deploys `batch_score` to a work pool.
"""

from __future__ import annotations

import sys

from opensig.score_flow import batch_score

__all__ = ["batch_score"]

if __name__ == "__main__":
    from opensig.cli import app

    app(["score-flow", *sys.argv[1:]], prog_name="pipelines/score.py")
