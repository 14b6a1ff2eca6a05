"""Where the memory of ``bitro demo`` goes: resident memory sampled every 0.25 s, summed up per logged step.

Runs the demo (``bitro._pipeline.demo``) in this process with a thread that samples the resident set size
(``psutil``) and a handler on the ``bitro`` logger that marks the start of every step. Prints one row per step
(from one log line to the next): its wall time and the highest RSS sampled in it, then the process's peak
(``ru_maxrss``, what ``/usr/bin/time -v bitro demo`` reports). Run from the repository root::

    python benchmarks/demo_memory.py                 # writes the demo into a temporary folder
    python benchmarks/demo_memory.py --out my_demo   # and keeps it
"""

from __future__ import annotations

import argparse
import logging
import resource
import tempfile
import threading
import time
from pathlib import Path

import psutil


class Marks(logging.Handler):
    """The time and first words of every record of the ``bitro`` logger."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.marks: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.marks.append((time.time(), record.getMessage()[:80]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="demo output folder (default: a temporary folder)")
    args = p.parse_args()

    import bitro as bt
    from bitro._pipeline import demo

    bt.settings.progress = False
    process = psutil.Process()
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.time(), process.memory_info().rss / 1e9))
            time.sleep(0.25)

    handler = Marks()
    logging.getLogger("bitro").addHandler(handler)
    threading.Thread(target=sample, daemon=True).start()
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        demo(args.out or Path(tmp) / "demo", overwrite=True)
    done.set()
    marks = [(start, "start (imports, reading the sections)"), *handler.marks, (time.time(), "end")]
    print("| step (from its log line to the next) | s | peak RSS GB |")
    print("|---|---|---|")
    for (t0, text), (t1, _) in zip(marks, marks[1:], strict=False):
        rss = [r for t, r in samples if t0 <= t < t1]
        if rss:  # a step shorter than one sample has no row; the process peak below still covers it
            print(f"| {text.replace('|', '/')} | {t1 - t0:.1f} | {max(rss):.2f} |")
    print(f"\nprocess peak RSS (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
    print(f"wall time: {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
