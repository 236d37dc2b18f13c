"""The monitor flow `opensig.monitor_flow.monitor`, runnable from here.

    python pipelines/monitor.py                   # once, now, no server needed
    python pipelines/monitor.py --serve           # on monitor.cron from params.yaml

Serving needs a Prefect server (`make prefect-server`) and PREFECT_API_URL pointing at it.
The same options as `opensig monitor-flow`; prefect.yaml deploys `monitor` to a work pool.
"""

from __future__ import annotations

import sys

from opensig.monitor_flow import monitor

__all__ = ["monitor"]

if __name__ == "__main__":
    from opensig.cli import app

    app(["monitor-flow", *sys.argv[1:]], prog_name="pipelines/monitor.py")
