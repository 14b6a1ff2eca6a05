"""Execute a tutorial notebook in place, top to bottom on the real data, and stamp it.

    python tutorials/execute.py tutorials/her2st_end_to_end.ipynb [more.ipynb ...]

Each notebook runs in a fresh kernel of this interpreter (the environment bitro is installed in), in a temporary
working folder, so nothing it writes lands in ``tutorials/``. On success its outputs are written back, each code
cell gets its wall time and the kernel's peak memory while it ran (``cell.metadata["bitro"]``, read by the authors
for the notebooks' time and memory notes), and the notebook's metadata records what the outputs were made with::

    metadata["bitro"] = {"version": bitro.__version__, "cells_sha256": <hash of the code cells>,
                         "defaults": <every default of bitro, name -> repr>, ...}

Figures larger than ``SHRINK_BYTES`` are stored as 256-colour PNGs (H&E backgrounds compress badly as full-colour
PNGs), so that a notebook stays under the size limit of ``tests/test_tutorials.py`` at matplotlib's default dpi.

``tests/test_tutorials.py`` fails when a notebook's code cells no longer match the hash (a cell was edited after
its outputs were made), when a default of bitro changed or went away since (``defaults``: function keyword defaults,
dataclass fields and ``DEFAULT_*`` constants; options added since do not count), or when the recorded version's major.minor is not the package's: re-execute
it with this script. A notebook that raises is left untouched.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

#: The separator between code cells in the hash (a string no cell holds).
_SEP = "\n\x00cell\x00\n"


def cells_sha256(nb) -> str:
    """SHA-256 of the notebook's code cells' sources, in order (outputs, markdown and metadata left out)."""
    code = [
        c["source"] if isinstance(c["source"], str) else "".join(c["source"])
        for c in nb["cells"]
        if c["cell_type"] == "code"
    ]
    return hashlib.sha256(_SEP.join(code).encode()).hexdigest()


def defaults() -> dict[str, str]:
    """Every default a tutorial's outputs can depend on, as ``name -> repr``.

    The keyword defaults of the public functions and classes of ``bt.pp``, ``bt.tl``, ``bt.pl``, ``bt.io``,
    ``bt.datasets`` and ``bt.predict_slide``; the field defaults of every dataclass in bitro's modules (the models'
    architectures, bag and training settings); and the ``DEFAULT_*`` constants of bitro's modules (defaults applied
    inside a function, such as ``gene_rank``); and each registered model's default LoRA layers (``lora_targets``,
    where its class fixes them). Defaults whose ``repr`` holds a memory address are left out.
    """
    import dataclasses
    import importlib
    import inspect
    import pkgutil

    import bitro

    out: dict[str, str] = {}

    def keep(name: str, value: object) -> None:
        text = repr(value)
        if " at 0x" not in text:
            out[name] = text

    def signature(name: str, obj: object) -> None:
        try:
            params = inspect.signature(obj).parameters.values()
        except (TypeError, ValueError):
            return
        for p in params:
            if p.default is not inspect.Parameter.empty:
                keep(f"{name}({p.name})", p.default)

    for mod in (bitro.pp, bitro.tl, bitro.pl, bitro.io, bitro.datasets):
        for attr in sorted(getattr(mod, "__all__", [])):
            obj = getattr(mod, attr)
            if callable(obj):
                signature(f"{mod.__name__}.{attr}", obj)
    signature("bitro.predict_slide", bitro.predict_slide)
    from bitro.tl.models import MODELS

    for name, spec in sorted(MODELS.items()):  # the layers bt.tl.transfer adapts by default, where fixed per class
        targets = vars(spec.network).get("lora_targets")
        if isinstance(targets, tuple | dict):
            keep(f"bitro.tl.models.MODELS[{name!r}].lora_targets", targets)
    for info in pkgutil.walk_packages(bitro.__path__, "bitro."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, value in sorted(vars(module).items()):
            if name.startswith("DEFAULT_"):
                keep(f"{info.name}.{name}", value)
            elif isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == info.name:
                for f in dataclasses.fields(value):
                    if f.default is not dataclasses.MISSING:
                        keep(f"{info.name}.{name}.{f.name}", f.default)
    return out


def changed_defaults(recorded: dict[str, str]) -> list[str]:
    """The defaults of ``recorded`` (a notebook's stamp) that are no longer what they were, or are gone.

    Options added since are not changes: a new option's default keeps the old behaviour.
    """
    now = defaults()
    return sorted(k for k, v in recorded.items() if now.get(k) != v)


#: PNG outputs above this size are re-encoded with a 256-colour palette.
SHRINK_BYTES = 150_000


def shrink_figures(nb) -> int:
    """Re-encode large PNG outputs as 256-colour palette PNGs (median cut) where that is smaller; bytes saved."""
    import base64
    import io

    from PIL import Image

    saved = 0
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "image/png" not in data:
                continue
            raw = base64.b64decode(data["image/png"])
            if len(raw) <= SHRINK_BYTES:
                continue
            with Image.open(io.BytesIO(raw)) as im:
                small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
            buf = io.BytesIO()
            small.save(buf, "PNG", optimize=True)
            if buf.tell() < len(raw):
                data["image/png"] = base64.b64encode(buf.getvalue()).decode()
                saved += len(raw) - buf.tell()
    return saved


def major_minor(version: str) -> str:
    """``"0.1"`` of ``"0.1.0.dev0"``."""
    return ".".join(version.split(".")[:2])


#: The HER2ST expression atlas of the development checkout (``../shared/data/`` beside the repository, as CI has it).
SHARED_ATLAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st_atlas"


def kernel_manager(folder: Path):
    """A kernel manager whose kernel runs this interpreter, via a kernel spec written to ``folder``.

    The kernel finds the shared HER2ST atlas through ``BITRO_HER2ST_ATLAS_DIR`` (as a user sets it) unless the
    variable is set already.
    """
    import os

    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = folder / "kernels" / "bitro-execute"
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "bitro",
        "language": "python",
    }
    if SHARED_ATLAS.is_dir() and not os.environ.get("BITRO_HER2ST_ATLAS_DIR"):
        spec["env"] = {"BITRO_HER2ST_ATLAS_DIR": str(SHARED_ATLAS)}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return KernelManager(
        kernel_name="bitro-execute", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(folder / "kernels")])
    )


class _PeakRSS:
    """Samples the resident memory of a process and its children every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.25):
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._rss())
            except Exception:  # noqa: BLE001  (the kernel is gone: stop sampling)
                return
            self._stop.wait(self.interval)

    def reset(self) -> None:
        self.peak = 0

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _git_commit(repo: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=repo, capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def execute(path: Path, *, timeout: int = 7200) -> dict:
    """Run ``path`` top to bottom in a fresh kernel; on success write its outputs and stamp back into ``path``."""
    import nbformat
    from nbclient import NotebookClient

    import bitro

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # a clean slate: nothing of an earlier run survives
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("bitro", None)
            cell.metadata.pop("execution", None)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"bitro_{path.stem}_") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        client = NotebookClient(
            nb, km=kernel_manager(Path(tmp)), timeout=timeout, resources={"metadata": {"path": str(work)}}
        )
        peaks = []
        with client.setup_kernel():
            with _PeakRSS(client.km.provisioner.pid) as rss:
                for index, cell in enumerate(nb.cells):
                    if cell.cell_type != "code":
                        continue
                    rss.reset()
                    t0 = time.perf_counter()
                    client.execute_cell(cell, index)  # raises CellExecutionError on any error
                    cell.metadata["bitro"] = {
                        "wall_s": round(time.perf_counter() - t0, 1),
                        "peak_rss_gb": round(max(rss.peak, rss._rss()) / 1e9, 2),
                    }
                    peaks.append(cell.metadata["bitro"]["peak_rss_gb"])
    stamp = {
        "version": bitro.__version__,
        "cells_sha256": cells_sha256(nb),
        "defaults": defaults(),
        "executed": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_s": round(time.perf_counter() - start, 1),
        "peak_rss_gb": max(peaks, default=0.0),
        "commit": _git_commit(Path(__file__).resolve().parents[1]),
    }
    nb.metadata["bitro"] = stamp
    shrink_figures(nb)
    nbformat.write(nb, path)
    return stamp


def main(argv: list[str] | None = None) -> int:
    """Execute and stamp each notebook named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=int, default=7200, help="seconds per cell (default 7200)")
    args = parser.parse_args(argv)
    for path in args.notebooks:
        print(f"executing {path} ...", flush=True)
        stamp = execute(path, timeout=args.timeout)
        print(
            f"{path}: {stamp['wall_s'] / 60:.1f} min, peak {stamp['peak_rss_gb']:.2f} GB, stamped {stamp}", flush=True
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
