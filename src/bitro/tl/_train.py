"""The one training loop of every model, used by :func:`bitro.tl.fit` and :func:`bitro.tl.transfer`.

Batches, early stopping on held-out training samples, ensembles, checkpoints and resume, progress, history.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bitro._checks import TrainingDivergedError
from bitro._logging import logger
from bitro._settings import settings
from bitro._utils import release_memory
from bitro.tl._metrics import pcc_gene

if TYPE_CHECKING:
    from bitro.tl._bags import CellData, Seq
    from bitro.tl.models._base import CellBagNetwork

#: Fraction of the training samples that ``validation="sample"`` holds out (at least one).
VALIDATION_SAMPLE_FRACTION = 0.2


@dataclass(frozen=True)
class TrainOptions:
    """The optimiser and batching settings of a training run (the network's loss settings are in its architecture).

    ``max_cells``: most cells of a bulk bag per step (random chunks); ``cell_dropout``: the probability of dropping
    each cell from its bag in a step; ``patience``: epochs without improvement of the validation score before
    stopping.
    """

    lr: float
    weight_decay: float
    batch_size: int
    cell_dropout: float
    patience: int
    max_cells: int

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrainOptions:
        """The options among a training function's arguments (``params``: its ``locals()``)."""
        return cls(**{f.name: params[f.name] for f in fields(cls)})


def check_validation(v: Any) -> None:
    """Check the ``validation`` argument of :func:`bitro.tl.fit` and :func:`bitro.tl.transfer`."""
    if not (v is None or v == "sample" or (isinstance(v, float) and 0 < v < 1)):
        msg = f"validation={v!r}: use 'sample' (hold out training samples), a fraction in (0, 1) of the bags, or None."
        raise ValueError(msg)


def split(
    samples: np.ndarray, validation: str | float | None, seed: int, member: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation rows of ensemble member ``member``.

    ``validation="sample"``: the samples are shuffled once (by ``seed``) and member ``k`` holds out the
    ``k``-th block of them, so the members of an ensemble validate on different samples in turn and every
    training sample is trained on by most members. A fraction: random bags, drawn per member.
    """
    idx = np.arange(len(samples))
    if validation is None:
        return idx, idx[:0]
    rng = np.random.default_rng(seed if validation == "sample" else seed + member)
    if validation == "sample":
        uniq = np.array(sorted(set(samples)))
        if len(uniq) < 2:
            msg = (
                f"validation='sample' holds out a training sample for early stopping, but there is only {list(uniq)}. "
                "Use validation=0.2 (a random fifth of the bags) or validation=None (train for `epochs`)."
            )
            raise ValueError(msg)
        n_val = max(1, round(VALIDATION_SAMPLE_FRACTION * len(uniq)))
        order = rng.permutation(uniq)
        held = order[(member * n_val + np.arange(n_val)) % len(uniq)]
        val = np.isin(samples, held)
    else:
        val = np.zeros(len(samples), bool)
        val[rng.choice(len(samples), size=max(1, round(validation * len(samples))), replace=False)] = True
    if val.all():
        msg = "The validation split left no training data; use a smaller validation fraction."
        raise ValueError(msg)
    return idx[~val], idx[val]


#: Training stops with an error when an epoch's mean loss exceeds this many times the untrained network's loss.
DIVERGENCE_FACTOR = 10.0
#: The yardstick of :data:`DIVERGENCE_FACTOR` is at least this loss (z-scored targets start near 1).
DIVERGENCE_FLOOR = 0.1


def diverged(what: str, lr: float) -> None:
    """Stop a diverging training run with one sentence (nothing is returned or written)."""
    msg = (
        f"Training diverged: {what}, so the model would predict nonsense; train again with a smaller learning rate "
        f"(lr={lr:g} now, try lr={lr / 10:g})."
    )
    raise TrainingDivergedError(msg)


def fingerprint(*parts: Any) -> str:
    """A short hash of a training run's inputs and settings (a checkpoint resumes only the run it belongs to)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_network(
    net: CellBagNetwork,
    bags: list[list[Seq]],
    yz: np.ndarray,
    cells: CellData,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    *,
    options: TrainOptions,
    seed: int,
    epochs: int,
    device: Any,
    folder: Path | None,
    desc: str,
    prepare: bool = False,
    reference: np.ndarray | None = None,
    aux: np.ndarray | None = None,
) -> tuple[CellBagNetwork, dict[str, Any]]:
    """Train one network; early stopping on ``val_idx`` when it is not empty. Returns ``(net, history)``.

    Only the parameters that require gradients are optimised (LoRA adapters, :func:`bitro.tl.transfer`). The loss is
    the network's own (:meth:`~bitro.tl.models._base.CellBagNetwork.loss`); its parts go into the history as
    ``"train_{part}"``. ``aux``: the bags' z-scored auxiliary targets ``(n_bags, k)`` (``aux_key`` of
    :func:`bitro.tl.fit`), passed to the loss as ``aux=`` (only networks with an auxiliary head take it); early
    stopping still watches the genes. With ``folder`` a checkpoint is written after every epoch and a run with the
    same data and settings resumes from it.
    """
    import torch
    from tqdm.auto import tqdm

    from bitro.tl._bags import collate
    from bitro.tl.models._base import predict_ensemble

    torch.manual_seed(seed)
    if prepare:  # what a fresh network derives from its training expression (before a checkpoint's weights load)
        ref = None if reference is None else torch.as_tensor(reference, dtype=torch.float32)
        net.prepare(torch.as_tensor(yz[train_idx], dtype=torch.float32), ref)
    net = net.to(device)
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=options.lr, weight_decay=options.weight_decay)
    with_aux = () if aux is None else (aux.shape, float(aux.sum()))  # runs without one keep their fingerprint
    run_id = fingerprint(
        net.arch.to_dict(),
        asdict(options),
        seed,
        train_idx.tolist(),
        val_idx.tolist(),
        yz.shape,
        float(yz.sum()),
        *with_aux,
    )
    history: dict[str, Any] = {"train_loss": [], "val_mse": [], "val_pcc_gene": []}
    state = {
        "epoch": 0,
        "best_score": None,
        "best_epoch": 0,
        "bad_epochs": 0,
        "stopped": False,
        "start_loss": None,
        "history": history,
    }
    best_state = None
    if folder is not None:
        restored = load_checkpoint(folder, net=net, optimizer=opt, fingerprint=run_id, epochs=epochs)
        if restored is not None:
            state, best_state = restored
            history = state["history"]
    monitor_pcc = len(val_idx) >= 3
    target = torch.as_tensor(yz, dtype=torch.float32)
    aux_target = None if aux is None else torch.as_tensor(aux, dtype=torch.float32)
    bs = options.batch_size
    bar = tqdm(total=epochs, desc=desc, disable=not settings.progress, initial=state["epoch"])
    for epoch in range(state["epoch"], epochs):
        if state["stopped"]:
            break
        rng = np.random.default_rng([seed, epoch])
        torch.manual_seed(seed * 1_000_003 + epoch)
        net.train()
        order = rng.permutation(train_idx)
        sums: dict[str, float] = {}
        for i in range(0, len(order), bs):
            idx = order[i : i + bs]
            batch = collate(
                [bags[j] for j in idx], cells, rng=rng, cell_dropout=options.cell_dropout, max_cells=options.max_cells
            ).to(device)
            extra = {} if aux_target is None else {"aux": aux_target[idx].to(device)}
            loss, parts = net.loss(batch, target[idx].to(device), **extra)
            if not torch.isfinite(loss):
                diverged(f"the training loss became {loss.item()} in epoch {epoch + 1}", options.lr)
            if state.get("start_loss") is None:
                state["start_loss"] = float(loss.item())  # the untrained network's loss, the watchdog's yardstick
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v.item()) * len(idx)
        for k, v in sums.items():
            history.setdefault(f"train_{k}", []).append(v / len(order))
        if history["train_loss"][-1] > DIVERGENCE_FACTOR * max(state["start_loss"], DIVERGENCE_FLOOR):
            diverged(
                f"the training loss rose to {history['train_loss'][-1]:.3g} in epoch {epoch + 1}, more than "
                f"{DIVERGENCE_FACTOR:g} times its start ({state['start_loss']:.3g})",
                options.lr,
            )
        post = {"loss": f"{history['train_loss'][-1]:.3f}"}
        if len(val_idx):
            pv, _, _ = predict_ensemble([net], [bags[j] for j in val_idx], cells)
            if not np.isfinite(pv).all():
                diverged(f"the validation predictions are not finite after epoch {epoch + 1}", options.lr)
            v_mse, v_pcc = float(np.mean((pv - yz[val_idx]) ** 2)), pcc_gene(pv, yz[val_idx])
            history["val_mse"].append(v_mse)
            history["val_pcc_gene"].append(v_pcc)
            score = v_pcc if monitor_pcc else -v_mse
            post.update(val_mse=f"{v_mse:.3f}", val_pcc=f"{v_pcc:.3f}")
            if state["best_score"] is None or score > state["best_score"]:
                state.update(best_score=score, best_epoch=epoch + 1, bad_epochs=0)
                best_state = copy.deepcopy(net.state_dict())
            else:
                state["bad_epochs"] += 1
            state["stopped"] = state["bad_epochs"] >= options.patience
        else:
            state["best_epoch"] = epoch + 1
        state["epoch"] = epoch + 1
        bar.set_postfix(post)
        bar.update()
        if folder is not None:
            save_checkpoint(
                folder, net=net, optimizer=opt, best_state=best_state, state=dict(state, fingerprint=run_id)
            )
    bar.close()
    if best_state is not None:
        net.load_state_dict(best_state)
    history["best_epoch"] = state["best_epoch"]
    release_memory()  # the training's temporaries, kept by the C allocator otherwise
    return net.eval(), history


def train_ensemble(
    build: Callable[[int], CellBagNetwork],
    bags: list[list[Seq]],
    yz: np.ndarray,
    cells: CellData,
    samples: np.ndarray,
    splits: list[tuple[np.ndarray, np.ndarray]],
    *,
    options: TrainOptions,
    seed: int,
    epochs: int,
    device: Any,
    desc: str,
    refit: bool = False,
    checkpoint_dir: str | Path | None = None,
    prepare: bool = True,
    reference: np.ndarray | None = None,
    aux: np.ndarray | None = None,
) -> tuple[list[CellBagNetwork], list[dict[str, Any]], list[dict[str, Any]]]:
    """Train one network per split (ensemble member ``k``: ``build(k)``, seed ``seed + k``, ``splits[k]``).

    With ``refit`` each member is trained again on all bags for its best number of epochs (a fresh ``build(k)``).
    ``prepare``: call each fresh network's :meth:`~bitro.tl.models._base.CellBagNetwork.prepare` with its training
    targets (and ``reference``, other sections' z-scored expression) first (:func:`bitro.tl.fit`; not for the
    fine-tuning of a trained network). ``aux``: the bags' z-scored auxiliary targets, or ``None``
    (:func:`train_network`).
    Returns the networks, their histories and the members' records (seed, validation samples).
    """
    import torch

    def seeded(k: int) -> CellBagNetwork:
        torch.manual_seed(seed + k)  # the same seed gives the same initial weights
        return build(k)

    nets, histories, members = [], [], []
    for k, (train_idx, val_idx) in enumerate(splits):
        s = seed + k
        folder = None if checkpoint_dir is None else Path(checkpoint_dir) / f"member{k}"
        common = {"options": options, "seed": s, "device": device, "prepare": prepare, "reference": reference, "aux": aux}
        net, hist = train_network(
            seeded(k), bags, yz, cells, train_idx, val_idx, epochs=epochs, folder=folder, desc=f"{desc} seed {s}", **common
        )
        members.append({"seed": s, "validation_samples": sorted(set(samples[val_idx]))})
        if refit and len(val_idx):
            all_idx = np.arange(len(bags))
            net, refit_hist = train_network(
                seeded(k),
                bags,
                yz,
                cells,
                all_idx,
                all_idx[:0],
                epochs=max(1, hist["best_epoch"]),
                folder=None if folder is None else folder / "refit",
                desc=f"refit seed {s}",
                **common,
            )
            hist.update({f"refit_{k}": v for k, v in refit_hist.items() if k.startswith("train_")})
        nets.append(net)
        histories.append(hist)
    return nets, histories, members


# -- checkpoints of an interrupted run ---------------------------------------------------------------------
#: One file per checkpoint: the tensors, with the training state (JSON) and their checksum in its metadata.
CHECKPOINT_FILE = "checkpoint.safetensors"
#: Files of the checkpoints of bitro < 0.3 (state and weights apart, which a stop between them could mix).
LEGACY_CHECKPOINT_FILES = ("checkpoint.json",)


def _tensor_digest(tensors: dict[str, Any]) -> str:
    """SHA-256 of named tensors: names, dtypes, shapes and bytes."""
    import torch

    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(folder: Path, *, net, optimizer, best_state: dict | None, state: dict[str, Any]) -> None:
    """Write the training state after an epoch: weights, best weights, Adam moments, counters and history.

    Everything goes into one file (the state as JSON in its metadata, with a checksum of the tensors), written
    to a temporary file and renamed over the previous checkpoint: a fit stopped at any moment leaves either the
    previous complete checkpoint or the new one, never a mix.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    if best_state is not None:
        tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in best_state.items()})
    for i, moments in optimizer.state_dict()["state"].items():
        tensors.update({f"opt.{i}.{k}": v.detach().cpu().contiguous() for k, v in moments.items()})
    metadata = {"format": "bitro-checkpoint", "state": json.dumps(state), "sha256": _tensor_digest(tensors)}
    tmp = folder / (CHECKPOINT_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(folder / CHECKPOINT_FILE)
    for name in LEGACY_CHECKPOINT_FILES:
        (folder / name).unlink(missing_ok=True)


def load_checkpoint(
    folder: Path, *, net, optimizer, fingerprint: str, epochs: int | None = None
) -> tuple[dict[str, Any], dict | None] | None:
    """Restore ``net`` and ``optimizer`` from ``folder``.

    Returns ``(state, best_state)``, or ``None`` when ``folder`` holds no checkpoint. Raises when the checkpoint
    is corrupted, belongs to another fit, or is further along than ``epochs`` (a longer run's).
    """
    from safetensors.torch import load_file

    file = folder / CHECKPOINT_FILE
    if not file.is_file():
        if any((folder / name).exists() for name in LEGACY_CHECKPOINT_FILES):
            msg = f"The checkpoint in {folder} was written by an older bitro and cannot be resumed; delete {folder} to start afresh."
            raise ValueError(msg)
        return None
    fix = f"delete {folder} to start afresh"
    from bitro.tl._persist import safetensors_metadata

    meta = safetensors_metadata(file)
    if meta.get("format") != "bitro-checkpoint":
        msg = f"{file} is not a checkpoint of this bitro (written by an older one?); {fix}."
        raise ValueError(msg)
    try:
        tensors = load_file(str(file))
        state = json.loads(meta["state"])
    except (ValueError, KeyError, OSError) as e:
        msg = f"The checkpoint {file} is corrupted or truncated ({e}); {fix}."
        raise ValueError(msg) from e
    if meta.get("sha256") != _tensor_digest(tensors):
        msg = f"The checkpoint {file} does not match its checksum (corrupted on disk); {fix}."
        raise ValueError(msg)
    if state.get("fingerprint") != fingerprint:
        msg = (
            f"The checkpoint in {folder} belongs to a different fit (other data or parameters). "
            "Give a new `checkpoint_dir`, or delete this one to start afresh."
        )
        raise ValueError(msg)
    if epochs is not None and state["epoch"] > epochs:
        msg = (
            f"The checkpoint in {folder} is from a longer run (epoch {state['epoch']}) than epochs={epochs} asks for, "
            f"and its state at epoch {epochs} is gone; give a new `checkpoint_dir`, delete this one, or pass "
            f"epochs>={state['epoch']}."
        )
        raise ValueError(msg)
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
