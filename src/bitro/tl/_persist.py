"""The trained model (:class:`BitroModel`) and its persistence: safetensors weights + a JSON config, no pickle."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bitro._checks import is_int
from bitro._constants import Key
from bitro._features import file_digest, plain
from bitro._logging import logger
from bitro.tl._config import FORMAT_VERSION, ModelConfig
from bitro.tl._targets import ZScore

if TYPE_CHECKING:
    from bitro.tl.models._base import CellBagNetwork

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
#: The arrays of the model's cell reference (scaler + PCA, phenotype centroids), ``"{record}.{array}"`` keys.
REFERENCE_FILE = "reference.safetensors"
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, REFERENCE_FILE)
#: Config entry with the checksums of the weights, of the reference arrays and of the fields giving them meaning.
CHECKSUMS = "checksums"
#: The config fields that give the weights their meaning; their digest is stored in the config and in the weights.
MEANING_FIELDS = ("target", "scale", "genes", "zscore_mean", "zscore_std", "architecture", "n_members", "feature_key")
#: Entries of ``config.json`` written beside the :class:`~bitro.tl._config.ModelConfig` fields.
SAVED_BESIDE = ("n_members", "history", "cell_reference", CHECKSUMS)
#: The arrays of each record of a cell reference (kept in :data:`REFERENCE_FILE`, not in the JSON config).
_REFERENCE_ARRAYS = {Key.EXTRACT_CELLS: "reducer", Key.PHENOTYPES: "centroids"}
#: Marks a saved reference record that had no arrays (a patch table's features are not fitted to any data).
_NO_ARRAYS = "saved_without_arrays"


def cell_reference(cells: Any, phenotype_key: str = Key.PHENOTYPE) -> dict[str, Any]:
    """What a model keeps of its training cell table, so new slides can be prepared with ``reference=model``.

    The extraction record (with the fitted scaler + PCA) and the record of the phenotypes in
    ``.obs[phenotype_key]`` (with the centroids), kept under their default names.
    """
    records = cells.uns.get(Key.UNS, {})
    where = {Key.EXTRACT_CELLS: Key.EXTRACT_CELLS, Key.PHENOTYPES: Key.keyed(Key.PHENOTYPES, phenotype_key, Key.PHENOTYPE)}
    return {name: copy.deepcopy(dict(records[key])) for name, key in where.items() if records.get(key) is not None}


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
        refit), plus ``"best_epoch"``. Each member's seed and validation samples are in ``config.members``.
    cell_reference
        What the model keeps of its training cell table: ``"extract_cells"`` (the extraction record with the
        fitted scaler + PCA) and ``"phenotypes"`` (the phenotype centroids). Pass the model as ``reference=`` to
        :func:`bitro.pp.extract_cells` and :func:`bitro.pp.phenotypes` to prepare a new slide's cells.
    """

    def __init__(
        self,
        nets: list[CellBagNetwork],
        config: ModelConfig,
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
        return list(self.config.genes)

    @property
    def zscore(self) -> ZScore:
        """Gene-wise z-score statistics of the training targets."""
        return ZScore(np.asarray(self.config.zscore_mean), np.asarray(self.config.zscore_std))

    @property
    def target(self) -> str:
        """``"spot"`` or ``"bulk"``."""
        return self.config.target

    @property
    def scale(self) -> str:
        """Target scale: ``"cp10k"``, ``"log1p"`` or ``"hist2st"``."""
        return self.config.scale

    def __repr__(self) -> str:
        n_par = sum(p.numel() for p in self.nets[0].parameters()) if self.nets else 0
        return (
            f"BitroModel(model={self.config.model!r}, target={self.target!r}, scale={self.scale!r}, n_genes={len(self.genes)}, "
            f"n_members={len(self.nets)}, n_parameters={n_par})"
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
        if path.exists() and not path.is_dir():
            msg = f"Cannot save the model to {str(path)!r}: it is a file; give a folder."
            raise FileExistsError(msg)
        tensors = {
            f"{k}.{name}": t.detach().cpu().contiguous()
            for k, net in enumerate(self.nets)
            for name, t in net.state_dict().items()
        }
        arrays, records = {}, {}
        for name, record in self.cell_reference.items():
            field = _REFERENCE_ARRAYS[name]
            records[name] = plain({k: v for k, v in record.items() if k != field})
            if record.get(field) is None:  # e.g. a patch table's record: nothing fitted
                records[name][_NO_ARRAYS] = True
                continue
            for k, v in record[field].items() if isinstance(record[field], dict) else [("", record[field])]:
                arrays[f"{name}.{field}.{k}".rstrip(".")] = torch.as_tensor(
                    np.asarray(v, dtype=np.float64)
                ).contiguous()
        config = dict(self.config.to_dict(), n_members=len(self.nets), history=self.history, cell_reference=records)
        meaning = meaning_digest(config)

        def write(folder: Path) -> None:
            save_file(
                tensors,
                str(folder / WEIGHTS_FILE),
                metadata={"format": "bitro", "n_members": str(len(self.nets)), "meaning_sha256": meaning},
            )
            save_file(arrays, str(folder / REFERENCE_FILE), metadata={"format": "bitro-reference"})
            config[CHECKSUMS] = {
                "weights_sha256": file_digest(folder / WEIGHTS_FILE),
                "reference_sha256": file_digest(folder / REFERENCE_FILE),
                "meaning_sha256": meaning,
            }
            (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))

        write_folder(path, (WEIGHTS_FILE, REFERENCE_FILE, CONFIG_FILE), write)
        logger.info(f"Saved {self!r} to {path}.")
        return path


#: Inside a folder that also holds other files, the complete new model files wait here while they are renamed into
#: place one by one; a save stopped between those renames is completed from it by the next save or load.
PENDING_SAVE = ".bitro-save.pending"


def write_folder(path: Path, files: tuple[str, ...], write: Any) -> None:
    """Write the files ``files`` of a saved model (or adapters) into the folder ``path`` so that a stop loses nothing.

    ``write(folder)`` writes them into a temporary folder. When ``path`` holds nothing else (or does not exist),
    that folder is swapped in whole (:mod:`bitro._atomic`). Otherwise the complete folder is renamed to
    :data:`PENDING_SAVE` inside ``path`` (the moment the new model is committed) and its files are moved into
    ``path`` (:func:`finish_save`): a stop before that moment leaves the old model, one after it the new model,
    completed by the next save or load.
    """
    from bitro._atomic import recover, sibling, staged

    path = Path(path)
    if path.exists() and not path.is_dir():
        msg = f"Cannot save to {str(path)!r}: it is a file; give a folder."
        raise FileExistsError(msg)
    finish_save(path)
    others = [p for p in path.iterdir() if p.name not in files] if path.is_dir() else []
    if path.exists() and path.resolve() == Path.cwd().resolve():
        others.append(path)  # never swap the working directory away
    if not others:  # the whole folder is the model: write it aside and swap it in
        with staged(path) as tmp:
            write(tmp)
        return
    recover(path / PENDING_SAVE)  # temporary folders of killed saves
    tmp = sibling((path / PENDING_SAVE).absolute(), "tmp")
    tmp.mkdir()
    try:
        write(tmp)
        tmp.rename(path / PENDING_SAVE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    finish_save(path)


def finish_save(path: Path) -> None:
    """Move the files of a committed save (:data:`PENDING_SAVE`) into ``path``; a no-op without one.

    The JSON config, which holds the checksums of the other files, is moved last.
    """
    pending = Path(path) / PENDING_SAVE
    if not pending.is_dir():
        return
    for name in sorted((p.name for p in pending.iterdir()), key=lambda n: (n.endswith(".json"), n)):
        (pending / name).replace(Path(path) / name)
    pending.rmdir()


#: Folder of the models shipped with bitro (one sub-folder per model name).
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "datasets" / "models"


def bundled_models() -> list[str]:
    """Names of the ready models shipped with bitro, loadable by name with :func:`load_model`.

    Returns
    -------
    The sorted names, e.g. ``["her2st"]``; each has a model card ``MODEL_CARD.md`` in its folder.

    Examples
    --------
    >>> import bitro as bt
    >>> bt.tl.bundled_models()
    ['her2st']
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
    if isinstance(path, str | Path) and not Path(path).exists():
        from bitro._atomic import recover

        recover(path)  # a save killed between its two renames left the previous model aside: put it back
    path = model_path(path)
    if not path.is_dir():
        msg = f"{str(path)!r} is a file, not a model folder; give the folder that holds {CONFIG_FILE}."
        raise FileNotFoundError(msg)
    finish_save(path)
    raw = read_config(path)
    config = ModelConfig.from_dict({k: v for k, v in raw.items() if k not in SAVED_BESIDE}, path / CONFIG_FILE)
    n_members = raw.get("n_members", 1)
    if not (is_int(n_members) and n_members >= 1):
        msg = f"The model config {path / CONFIG_FILE} is invalid: n_members must be a positive integer, got {n_members!r}."
        raise ValueError(msg)
    states = read_weights(path / WEIGHTS_FILE)
    verify_checksums(path, raw)
    check_members(states, raw, path / WEIGHTS_FILE)
    nets = build_nets(config, n_members, states, device=device)
    reference = read_reference(path, raw.get("cell_reference", {}))
    return BitroModel(nets, config, raw.get("history", []), reference)


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
        if record.get(_NO_ARRAYS):
            out[name] = {k: v for k, v in record.items() if k != _NO_ARRAYS}
            continue
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
        msg = f"{file} has format version {config['format_version']}; this bitro reads version {FORMAT_VERSION}. " + (
            "Update bitro." if newer else "The model was saved by an older bitro: train it again."
        )
        raise ValueError(msg)
    if not isinstance(config, dict):
        msg = f"The model config {file} is not a JSON object; it was not written by `BitroModel.save`."
        raise ValueError(msg)
    return config


def meaning_digest(config: dict[str, Any]) -> str:
    """SHA-256 of the config fields that give the weights their meaning (:data:`MEANING_FIELDS`, feature fingerprint)."""
    parts = {k: plain(config.get(k)) for k in MEANING_FIELDS}
    if config.get("model", "bitro") != "bitro":  # BiTro models were saved before other models existed
        parts["model"] = config["model"]
    if config.get("patch_key") is not None:  # models saved before patch tokens keep their digest
        parts["patch_key"] = config["patch_key"]
    parts["features"] = (
        (config.get("features") or {}).get("fingerprint") if isinstance(config.get("features"), dict) else None
    )
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def safetensors_metadata(file: Path) -> dict[str, str]:
    """The metadata of a safetensors file, with a clear error when its header cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - any unreadable header is a corrupted file
        msg = f"The model weights {file} are corrupted or truncated ({e}); save the model again."
        raise ValueError(msg) from e


def verify_checksums(path: Path, config: dict[str, Any]) -> None:
    """Raise when the weights, the reference arrays or the genes / scaling / architecture were changed since saving.

    A model saved without checksums (by an older bitro) loads with a warning.
    """
    sums = config.get(CHECKSUMS)
    if sums is None:
        logger.warning(
            f"The model {path} was saved without checksums, so bitro cannot check that it is intact; save it again "
            "with `model.save(path)`."
        )
        return
    if not isinstance(sums, dict) or not all(
        isinstance(sums.get(k), str) for k in ("weights_sha256", "meaning_sha256")
    ):
        msg = f"The model config {path / CONFIG_FILE} has malformed checksums {sums!r}; save the model again."
        raise ValueError(msg)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        msg = f"Model weights {weights} are missing."
        raise FileNotFoundError(msg)
    if file_digest(weights) != sums["weights_sha256"]:
        msg = (
            f"The model weights {weights} do not match the checksum in {CONFIG_FILE}: they were corrupted or changed "
            "(or the folder mixes files of two saves); save the model again from its source."
        )
        raise ValueError(msg)
    reference = path / REFERENCE_FILE
    if sums.get("reference_sha256") and reference.is_file() and file_digest(reference) != sums["reference_sha256"]:
        msg = (
            f"The model's cell reference {reference} does not match the checksum in {CONFIG_FILE}: it was corrupted "
            "or changed; save the model again from its source."
        )
        raise ValueError(msg)
    meaning = meaning_digest(config)
    if meaning != sums["meaning_sha256"] or meaning != safetensors_metadata(weights).get("meaning_sha256"):
        msg = (
            f"The genes, z-score statistics or architecture in {path / CONFIG_FILE} were changed after the model was "
            "saved, so its predictions would be labelled or scaled wrongly; use the config.json saved with the weights."
        )
        raise ValueError(msg)


def check_members(states: dict[str, Any], config: dict[str, Any], file: Path) -> None:
    """Raise when the weights are not finite or hold another number of ensemble members than the config says."""
    import torch

    bad = [k for k, t in states.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        msg = (
            f"The model weights {file} hold NaN or infinite values ({len(bad)} tensors, e.g. {bad[0]!r}), so every "
            "prediction would be NaN; train the model again (with a smaller learning rate if training diverged)."
        )
        raise ValueError(msg)
    found = sorted({int(k.split(".", 1)[0]) for k in states if k.split(".", 1)[0].isdigit()})
    n = int(config.get("n_members", 1))
    if found != list(range(n)):
        msg = (
            f"The model weights {file} hold {len(found)} ensemble members but {CONFIG_FILE} says n_members={n}; "
            "use the config.json saved with these weights."
        )
        raise ValueError(msg)


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


def build_nets(
    config: ModelConfig, n_members: int, states: dict[str, Any] | None, *, device: str | None = None
) -> list[CellBagNetwork]:
    """``n_members`` networks of the config's model and architecture, loaded with ``states`` (``"{member}.{name}"``)."""
    from bitro._utils import resolve_device
    from bitro.tl.models import get_model

    network = get_model(config.model).network
    nets = []
    for k in range(n_members):
        net = network(config.architecture)
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
