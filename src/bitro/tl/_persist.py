"""The trained model (:class:`BitroModel`) and its persistence: safetensors weights + a JSON config, no pickle."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bitro._constants import Key
from bitro._features import plain
from bitro._logging import logger
from bitro.tl._targets import ZScore

if TYPE_CHECKING:
    from bitro.tl._model import BitroNet

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
#: The arrays of the model's cell reference (scaler + PCA, phenotype centroids), ``"{record}.{array}"`` keys.
REFERENCE_FILE = "reference.safetensors"
FORMAT_VERSION = 2
_REQUIRED = (
    "format_version",
    "target",
    "scale",
    "genes",
    "zscore_mean",
    "zscore_std",
    "architecture",
    "bags",
    "features",
)
#: The arrays of each record of a cell reference (kept in :data:`REFERENCE_FILE`, not in the JSON config).
_REFERENCE_ARRAYS = {Key.EXTRACT_CELLS: "reducer", Key.PHENOTYPES: "centroids"}


def cell_reference(cells: Any) -> dict[str, Any]:
    """What a model keeps of its training cell table: the extraction record (with the fitted scaler + PCA) and
    the phenotype record (with the centroids), so new slides can be prepared with ``reference=model``."""
    records = cells.uns.get(Key.UNS, {})
    out = {}
    for name in _REFERENCE_ARRAYS:
        if records.get(name) is not None:
            out[name] = copy.deepcopy(dict(records[name]))
    return out


class BitroModel:
    """A trained BiTro model: one network per seed of the ensemble, the genes, and the target statistics.

    Made by :func:`bitro.tl.fit`, used by :func:`bitro.tl.predict`, written by :meth:`save` and read
    back by :func:`bitro.tl.load_model`.

    Attributes
    ----------
    nets
        The trained networks (:class:`torch.nn.Module`), one per ensemble member.
    config
        JSON-able description: target (``"spot"``/``"bulk"``), target scale, genes, z-score statistics,
        feature key, ``"features"`` (the settings that define the cell features and their fingerprint),
        architecture, bag parameters (with the training spots' radius in um) and the training parameters.
    history
        Per ensemble member, the training history: a dict of lists per epoch (``"train_loss"``,
        ``"train_mse"``, ``"train_cluster"``, ``"val_mse"``, ``"val_pcc_gene"``; ``"refit_train_*"`` after a
        refit), plus ``"best_epoch"``. Each member's seed and validation samples are in ``config["members"]``.
    cell_reference
        What the model keeps of its training cell table: ``"extract_cells"`` (the extraction record with the
        fitted scaler + PCA) and ``"phenotypes"`` (the phenotype centroids). Pass the model as ``reference=`` to
        :func:`bitro.pp.extract_cells` and :func:`bitro.pp.phenotypes` to prepare a new slide's cells.
    """

    def __init__(
        self,
        nets: list[BitroNet],
        config: dict[str, Any],
        history: list[dict[str, Any]],
        cell_reference: dict[str, Any] | None = None,
    ):
        self.nets = nets
        self.config = config
        self.history = history
        self.cell_reference = cell_reference or {}

    @property
    def genes(self) -> list[str]:
        """The genes the model predicts, in output order."""
        return list(self.config["genes"])

    @property
    def zscore(self) -> ZScore:
        """Gene-wise z-score statistics of the training targets."""
        return ZScore(np.asarray(self.config["zscore_mean"]), np.asarray(self.config["zscore_std"]))

    @property
    def target(self) -> str:
        """``"spot"`` or ``"bulk"``."""
        return str(self.config["target"])

    @property
    def scale(self) -> str:
        """Target scale: ``"cp10k"`` or ``"log1p"``."""
        return str(self.config["scale"])

    def __repr__(self) -> str:
        n_par = sum(p.numel() for p in self.nets[0].parameters()) if self.nets else 0
        return (
            f"BitroModel(target={self.target!r}, scale={self.scale!r}, n_genes={len(self.genes)}, "
            f"n_seeds={len(self.nets)}, n_parameters={n_par})"
        )

    def save(self, path: str | Path) -> Path:
        """Write the model to the folder ``path``: ``config.json``, ``weights.safetensors`` and ``reference.safetensors``.

        Parameters
        ----------
        path
            Folder to write (created if needed; existing model files in it are replaced).

        Returns
        -------
        The folder.

        Examples
        --------
        >>> model.save("my_model")  # doctest: +SKIP
        >>> model = bt.tl.load_model("my_model")  # doctest: +SKIP
        """
        import torch
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{k}.{name}": t.detach().cpu().contiguous()
            for k, net in enumerate(self.nets)
            for name, t in net.state_dict().items()
        }
        save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "bitro", "n_members": str(len(self.nets))})
        arrays, records = {}, {}
        for name, record in self.cell_reference.items():
            field = _REFERENCE_ARRAYS[name]
            records[name] = plain({k: v for k, v in record.items() if k != field})
            for k, v in (record[field].items() if isinstance(record[field], dict) else [("", record[field])]):
                arrays[f"{name}.{field}.{k}".rstrip(".")] = torch.as_tensor(np.asarray(v, dtype=np.float64)).contiguous()
        save_file(arrays, str(path / REFERENCE_FILE), metadata={"format": "bitro-reference"})
        config = dict(self.config, n_members=len(self.nets), history=self.history, cell_reference=records)
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        logger.info(f"Saved {self!r} to {path}.")
        return path


#: Folder of the models shipped with bitro (one sub-folder per model name).
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "datasets" / "models"


def bundled_models() -> list[str]:
    """Names of the ready models shipped with bitro, loadable by name with :func:`load_model`.

    Returns
    -------
    The sorted names, e.g. ``["her2st"]``; each has a model card ``MODEL_CARD.md`` in its folder.

    Examples
    --------
    >>> from bitro.tl._persist import bundled_models
    >>> "her2st" in bundled_models()  # doctest: +SKIP
    True
    """
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(d.name for d in BUNDLED_DIR.iterdir() if (d / CONFIG_FILE).is_file())


def model_path(path: str | Path) -> Path:
    """The folder of a model given as a folder or as the name of a bundled model (an existing path wins)."""
    given = Path(path)
    if given.exists():
        return given
    names = bundled_models()
    if isinstance(path, str) and path in names:
        return BUNDLED_DIR / path
    looks_like_name = isinstance(path, str) and "/" not in path and "\\" not in path and not path.startswith(".")
    what = f"no bundled model is called {str(path)!r}" if looks_like_name else f"there is no folder {str(path)!r}"
    msg = (
        f"Cannot load the model {str(path)!r}: {what}. Give a folder written by `model.save(path)` or one of the "
        f"bundled models {names}."
    )
    raise FileNotFoundError(msg)


def load_model(path: str | Path, *, device: str | None = None) -> BitroModel:
    """Read a model written by :meth:`BitroModel.save`, or a ready model shipped with bitro by name.

    Parameters
    ----------
    path
        The model folder, or the name of a model shipped with bitro (``"her2st"``: trained on the four
        bundled HER2ST breast cancer sections; see ``bitro/datasets/models/her2st/MODEL_CARD.md``).
        An existing path is always read as a folder.
    device
        Torch device for the networks; default ``bitro.settings.device``.

    Returns
    -------
    The model, in evaluation mode.

    Examples
    --------
    >>> model = bt.tl.load_model("my_model")  # doctest: +SKIP
    >>> model = bt.tl.load_model("her2st")  # doctest: +SKIP
    """
    path = model_path(path)
    if not path.is_dir():
        msg = f"{str(path)!r} is a file, not a model folder; give the folder that holds {CONFIG_FILE}."
        raise FileNotFoundError(msg)
    config = read_config(path)
    states = read_weights(path / WEIGHTS_FILE)
    nets = build_nets(config, states, device=device)
    reference = read_reference(path, config.get("cell_reference", {}))
    kept = {k: v for k, v in config.items() if k not in ("history", "n_members", "cell_reference")}
    return BitroModel(nets, kept, config.get("history", []), reference)


def read_reference(path: Path, records: dict[str, Any]) -> dict[str, Any]:
    """The cell reference of a saved model: its JSON records with their arrays put back from :data:`REFERENCE_FILE`."""
    if not records:
        return {}
    tensors = read_weights(path / REFERENCE_FILE)
    out = {}
    for name, record in records.items():
        field = _REFERENCE_ARRAYS.get(name)
        if field is None:
            msg = f"The model config {path / CONFIG_FILE} has an unknown cell reference record {name!r}."
            raise ValueError(msg)
        prefix = f"{name}.{field}"
        arrays = {k[len(prefix) + 1 :]: t.numpy() for k, t in tensors.items() if k.startswith(prefix + ".")}
        if prefix in tensors:
            arrays = tensors[prefix].numpy()
        if not len(arrays):
            msg = f"{path / REFERENCE_FILE} lacks the arrays {prefix!r}; the model folder is incomplete. Save it again."
            raise ValueError(msg)
        out[name] = {**record, field: arrays}
    return out


def read_config(path: Path) -> dict[str, Any]:
    """The JSON config of a saved model folder, checked."""
    file = path / CONFIG_FILE
    if not file.is_file():
        msg = f"{path} is not a saved bitro model: {CONFIG_FILE} is missing. Save one with `model.save(path)`."
        raise FileNotFoundError(msg)
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = f"The model config {file} is corrupted or truncated ({e}); save the model again."
        raise ValueError(msg) from e
    if isinstance(config, dict) and "format_version" in config and config["format_version"] != FORMAT_VERSION:
        newer = config["format_version"] > FORMAT_VERSION
        msg = (
            f"{file} has format version {config['format_version']}; this bitro reads version {FORMAT_VERSION}. "
            + ("Update bitro." if newer else "The model was saved by an older bitro: train it again.")
        )
        raise ValueError(msg)
    missing = [k for k in _REQUIRED if k not in config] if isinstance(config, dict) else list(_REQUIRED)
    if missing:
        msg = f"The model config {file} lacks {missing}; it was not written by `BitroModel.save`."
        raise ValueError(msg)
    return config


def read_weights(file: Path) -> dict[str, Any]:
    """The tensors of a safetensors file, with a clear error when it is missing or corrupted."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        msg = f"Model weights {file} are missing."
        raise FileNotFoundError(msg)
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        msg = f"The model weights {file} are corrupted or truncated ({e}); save the model again."
        raise ValueError(msg) from e


def build_nets(config: dict[str, Any], states: dict[str, Any] | None, *, device: str | None = None) -> list[BitroNet]:
    """Networks of ``config``'s architecture, loaded with ``states`` (``"{member}.{name}"`` keys) when given."""
    from bitro.tl._fit import resolve_device
    from bitro.tl._model import Architecture, BitroNet

    arch = Architecture(**config["architecture"])
    n = int(config.get("n_members", 1))
    nets = []
    for k in range(n):
        net = BitroNet(arch)
        if states is not None:
            prefix = f"{k}."
            own = {name[len(prefix) :]: t for name, t in states.items() if name.startswith(prefix)}
            try:
                net.load_state_dict(own, strict=True)
            except RuntimeError as e:
                msg = f"The saved weights do not match the saved architecture (member {k}): {e}"
                raise ValueError(msg) from e
        nets.append(net.to(resolve_device(device)).eval())
    return nets


# -- checkpoints of an interrupted fit --------------------------------------------------------------------
CHECKPOINT_STATE = "checkpoint.json"
CHECKPOINT_WEIGHTS = "checkpoint.safetensors"


def save_checkpoint(folder: Path, *, net, optimizer, best_state: dict | None, state: dict[str, Any]) -> None:
    """Write the training state after an epoch: weights, best weights, Adam moments, counters and history.

    The JSON is written last (after the weights, via a temporary file), so a fit killed while writing
    resumes from the previous complete checkpoint.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    if best_state is not None:
        tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in best_state.items()})
    for i, moments in optimizer.state_dict()["state"].items():
        tensors.update({f"opt.{i}.{k}": v.detach().cpu().contiguous() for k, v in moments.items()})
    tmp = folder / (CHECKPOINT_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(folder / CHECKPOINT_WEIGHTS)
    tmp = folder / (CHECKPOINT_STATE + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(folder / CHECKPOINT_STATE)


def load_checkpoint(folder: Path, *, net, optimizer, fingerprint: str) -> tuple[dict[str, Any], dict | None] | None:
    """Restore ``net`` and ``optimizer`` from ``folder``.

    Returns ``(state, best_state)``, or ``None`` when ``folder`` holds no checkpoint.
    """
    file = folder / CHECKPOINT_STATE
    if not file.is_file():
        return None
    try:
        state = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = f"The checkpoint {file} is corrupted ({e}); delete {folder} to start afresh."
        raise ValueError(msg) from e
    if state.get("fingerprint") != fingerprint:
        msg = (
            f"The checkpoint in {folder} belongs to a different fit (other data or parameters). "
            "Give a new `checkpoint_dir`, or delete this one to start afresh."
        )
        raise ValueError(msg)
    tensors = read_weights(folder / CHECKPOINT_WEIGHTS)
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": optimizer.state_dict()["param_groups"]})
    logger.info(f"Resuming from the checkpoint in {folder} (epoch {state['epoch']}).")
    return state, best
