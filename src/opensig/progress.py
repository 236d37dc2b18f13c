"""Progress bars counted in images, the unit a person thinks in whatever the batch size.

Bars show on a terminal only (tqdm's ``disable=None``): piped into a log, DVC's or Prefect's
output, a bar would add a line per refresh, and the stages' log lines already say the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


@contextmanager
def image_bar(total: int, desc: str, initial: int = 0, show: bool = True) -> Iterator[tqdm]:
    """A bar over ``total`` images, already ``initial`` done (a resumed training), so that its
    rate is in images/s and its ETA covers all of them (a training: every epoch's images).

    While it is drawn, console log lines go above it instead of through it. ``show=False``
    hides it even on a terminal (predict without progress, DDP ranks but 0).
    """
    bar = tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="img",
        leave=False,
        disable=None if show else True,
    )
    with bar, nullcontext() if bar.disable else logging_redirect_tqdm(tqdm_class=tqdm):
        yield bar
