"""Training progress that reports whether or not the output is a terminal.

On a terminal: a ``tqdm`` bar on stderr. Elsewhere (a log file, ``nohup``, CI, a notebook's captured stderr), where
a bar would print nothing useful: one plain line every ``every`` steps and at the end of the epoch, e.g.
``epoch 2/10 step 40/100 (40%) 12.5 step/s``."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class LineProgress:
    """The part of ``tqdm``'s interface the trainer uses (``update``, ``close``), as a line every ``every`` steps."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", every: int | None = None,
                 stream: TextIO | None = None):
        self.total, self.n, self.desc = int(total), int(initial), desc
        self.every = max(1, int(every) if every else max(1, round(self.total / 10)))
        self.stream = stream if stream is not None else sys.stderr
        self._start, self._start_n = time.perf_counter(), self.n
        self._last = self.n

    def _line(self) -> None:
        rate = (self.n - self._start_n) / max(1e-9, time.perf_counter() - self._start)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        print(f"{self.desc} step {self.n}/{self.total}{pct} {rate:.1f} step/s", file=self.stream, flush=True)
        self._last = self.n

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.n % self.every == 0 and self.n != self.total:
            self._line()

    def close(self) -> None:
        if self.n != self._last or self.n == self.total:
            self._line()


class _Off:
    def update(self, k: int = 1) -> None: ...

    def close(self) -> None: ...


def progress_bar(total: int, initial: int = 0, desc: str = "", enabled: bool = True, every: int | None = None):
    """A tqdm bar on a terminal, :class:`LineProgress` lines otherwise, nothing when not ``enabled``."""
    if not enabled:
        return _Off()
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)
    return LineProgress(total, initial, desc, every)
