"""LoRA adapters (:mod:`peft`) on a model's networks, and the fine-tuned model that keeps them apart from its base.

:class:`TransferredModel`, :func:`load_adapters`, and the network surgery of :func:`bitro.tl.transfer`: carrying gene
rows over by symbol, injecting and merging adapters. :mod:`peft` (which imports transformers, ~5 s) is imported only
inside these functions.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitro._features import file_digest
from bitro._logging import logger
from bitro._utils import resolve_device
from bitro.tl._config import ModelConfig
from bitro.tl._persist import CHECKSUMS, BitroModel, finish_save, read_weights, write_folder

if TYPE_CHECKING:
    from bitro.tl.models._base import CellBagNetwork

ADAPTER_NAME = "default"
ADAPTER_CONFIG = "adapters.json"
ADAPTER_WEIGHTS = "adapters.safetensors"


# -- networks --------------------------------------------------------------------------------------------
def has_adapters(net: CellBagNetwork) -> bool:
    """Whether ``net`` holds unmerged LoRA layers."""
    return any(hasattr(m, "lora_A") for m in net.modules())


def merged_net(net: CellBagNetwork) -> CellBagNetwork:
    """A copy of ``net`` with its LoRA adapters merged into the base layers: a plain :class:`CellBagNetwork`."""
    net = copy.deepcopy(net)
    if not has_adapters(net):
        return net
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(net.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, module.get_base_layer())
    return net


def model_fingerprint(model: BitroModel) -> str:
    """Hash of a model's architecture, genes, features and weights (identifies the base of saved adapters)."""
    h = hashlib.sha256()
    saved = model.config.to_dict()
    meta = {k: saved.get(k) for k in ("architecture", "genes", "feature_key", "target", "scale")}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for net in model.nets:
        for name, t in sorted(net.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def carry_genes(
    source: CellBagNetwork, source_genes: list[str], genes: list[str], *, seed: int, **arch_update: Any
) -> CellBagNetwork:
    """A network for ``genes``: every weight of ``source``, gene rows matched by symbol, new genes initialised fresh.

    ``arch_update``: architecture fields to replace (e.g. the target data's bag-size statistics).
    """
    import torch

    arch = type(source.arch).from_dict({**source.arch.to_dict(), **arch_update, "n_genes": len(genes)})
    torch.manual_seed(seed)
    net = type(source)(arch)
    pos = {g: i for i, g in enumerate(source_genes)}
    rows = [i for i, g in enumerate(genes) if g in pos]
    src_rows = [pos[genes[i]] for i in rows]
    state = net.state_dict()
    for name, t in source.state_dict().items():
        if name in source.gene_params:
            state[name][rows] = t[src_rows]
        elif name != "bank":  # the retrieval bank holds the source's training profiles: the caller sets a new one
            state[name] = t
    net.load_state_dict(state)
    return net


def _in_shared_head(net: CellBagNetwork, name: str) -> bool:
    """Whether ``name`` is in a part of the gene head shared by all genes (trained in full with the gene rows)."""
    return any(name == head or name.startswith(head + ".") for head in getattr(net, "shared_head", ()))


def check_lora_targets(net: CellBagNetwork, targets: list[str]) -> None:
    from torch import nn

    linear = sorted(
        {
            n.rpartition(".")[2]
            for n, m in net.named_modules()
            if isinstance(m, nn.Linear) and not _in_shared_head(net, n)
        }
    )
    for t in targets:
        hits = [(n, m) for n, m in net.named_modules() if n and (n == t or n.endswith("." + t))]
        if not hits:
            msg = f"target_modules: no layer is named {t!r}; LoRA can target these torch.nn.Linear layers: {linear}."
            raise ValueError(msg)
        for n, m in hits:
            if not isinstance(m, nn.Linear) or _in_shared_head(net, n):
                what = (
                    "the readout is trained in full"
                    if _in_shared_head(net, n)
                    else f"it is a {type(m).__module__}.{type(m).__name__}, not a torch.nn.Linear"
                )
                msg = (
                    f"target_modules: {t!r} names {n!r}, which LoRA cannot target here ({what}); use some of {linear}."
                )
                raise ValueError(msg)


def inject(net: CellBagNetwork, lora: dict[str, Any], *, seed: int) -> CellBagNetwork:
    """Add LoRA adapters to ``net`` in place (base weights frozen by peft)."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=lora["rank"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=list(lora["target_modules"]),
        bias="none",
    )
    return inject_adapter_in_model(config, net, adapter_name=ADAPTER_NAME)


def add_lora(net: CellBagNetwork, lora: dict[str, Any], *, train_genes: str, new_rows, seed: int) -> None:
    """Prepare ``net`` for LoRA fine-tuning in place: adapters on, base weights frozen, the gene head trainable.

    Adapters go on ``lora["target_modules"]``. The gene head trains with ``train_genes="all"``; with ``"new"`` only
    while some gene of ``new_rows`` (a boolean tensor over the genes) is new.
    """
    check_lora_targets(net, lora["target_modules"])
    inject(net, lora, seed=seed)
    for name, p in net.named_parameters():
        if is_head(net, name, train_genes):
            p.requires_grad_(train_genes == "all" or bool(new_rows.any()))


def count_trained(net: CellBagNetwork, train_genes: str, new_rows) -> tuple[int, int]:
    """How many parameters fine-tuning trains, and how many the network has (LoRA weights not counted in the total).

    With ``train_genes="new"`` only the new genes' rows of a per-gene parameter count (the others are masked).
    """
    n_total = sum(p.numel() for n, p in net.named_parameters() if ".lora_" not in n)
    n_trained = sum(
        (int(new_rows.sum()) * p[0].numel() if train_genes == "new" and n in net.gene_params else p.numel())
        for n, p in net.named_parameters()
        if p.requires_grad
    )
    return n_trained, n_total


def is_head(net: CellBagNetwork, name: str, train_genes: str) -> bool:
    """Whether the parameter ``name`` belongs to the gene head that fine-tuning trains (``train_genes``)."""
    return name in net.gene_params or (train_genes == "all" and _in_shared_head(net, name))


def adapter_names(net: CellBagNetwork, train_genes: str) -> list[str]:
    """Names of the tensors an adapter file holds: LoRA weights, the trained head and any retrieval bank.

    The bank is the fine-tuning bags' targets (``retrieval_weight`` of a spot model).
    """
    return [n for n in net.state_dict() if ".lora_" in n or n == "bank" or is_head(net, n, train_genes)]


# -- the fine-tuned model ----------------------------------------------------------------------------------
class TransferredModel(BitroModel):
    """A model fine-tuned by :func:`bitro.tl.transfer`: a :class:`~bitro.tl.BitroModel` whose networks may hold LoRA adapters.

    It predicts like any model (:func:`bitro.tl.predict`). :meth:`save_adapters` writes only what fine-tuning
    trained (a small file tied to the base model's fingerprint; read back with :func:`bitro.tl.load_adapters`),
    :meth:`merge` folds the adapters into the base weights, :meth:`save` writes the merged, stand-alone model.
    ``config.transfer`` describes the transfer: source target, base fingerprint, method, LoRA settings, genes
    carried over / new / dropped, parameters trained.
    """

    def __repr__(self) -> str:
        info = self.config.transfer
        base = super().__repr__().removeprefix("BitroModel(")
        return f"TransferredModel(from={info['source_target']!r}, method={info['method']!r}, adapters={self.has_adapters}, {base}"

    @property
    def has_adapters(self) -> bool:
        """Whether the networks hold unmerged LoRA adapters."""
        return any(has_adapters(net) for net in self.nets)

    def merge(self) -> BitroModel:
        """The model with its adapters merged into the base weights (predictions unchanged).

        Returns
        -------
        A plain :class:`~bitro.tl.BitroModel` (new networks; this model is not changed).

        Examples
        --------
        >>> merged = tuned.merge()  # doctest: +SKIP
        """
        nets = [merged_net(net).eval() for net in self.nets]
        config = copy.deepcopy(self.config)
        config.transfer["merged"] = True
        return BitroModel(nets, config, copy.deepcopy(self.history), copy.deepcopy(self.cell_reference))

    def save(self, path: str | Path) -> Path:
        """Write the merged, stand-alone model (read it with :func:`bitro.tl.load_model`); see :meth:`save_adapters`.

        Parameters
        ----------
        path
            Folder to write.

        Returns
        -------
        The folder.
        """
        return self.merge().save(path)

    def save_adapters(self, path: str | Path) -> Path:
        """Write only the adapters and the trained head, apart from the base model.

        Parameters
        ----------
        path
            Folder to write: ``adapters.safetensors`` (LoRA weights, gene queries and readout of the target genes)
            and ``adapters.json`` (the base model's fingerprint, LoRA settings, genes and target statistics).

        Returns
        -------
        The folder.

        Examples
        --------
        >>> tuned.save_adapters("adapters")  # doctest: +SKIP
        >>> tuned = bt.tl.load_adapters(base, "adapters")  # doctest: +SKIP
        """
        from safetensors.torch import save_file

        if not self.has_adapters:
            msg = "This model has no LoRA adapters (method='full', or merged); save the whole model with `model.save(path)`."
            raise ValueError(msg)
        path = Path(path)
        train_genes = self.config.transfer["train_genes"]
        tensors = {}
        for k, net in enumerate(self.nets):
            state = net.state_dict()
            tensors.update({f"{k}.{n}": state[n].detach().cpu().contiguous() for n in adapter_names(net, train_genes)})
        config = dict(self.config.to_dict(), n_members=len(self.nets), history=self.history)

        def write(folder: Path) -> None:
            save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "bitro-adapters"})
            config[CHECKSUMS] = {"weights_sha256": file_digest(folder / ADAPTER_WEIGHTS)}
            (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))

        write_folder(path, (ADAPTER_WEIGHTS, ADAPTER_CONFIG), write)  # written aside: a stop loses nothing
        logger.info(
            f"Saved the adapters of {self!r} to {path} (base model {self.config.transfer['base_fingerprint']})."
        )
        return path


def load_adapters(base: BitroModel, path: str | Path, *, device: str | None = None) -> TransferredModel:
    """Put adapters written by :meth:`TransferredModel.save_adapters` back onto their base model.

    Parameters
    ----------
    base
        The model that was fine-tuned (from :func:`bitro.tl.fit` or :func:`bitro.tl.load_model`); it is not changed.
    path
        The adapter folder.
    device
        Torch device; default ``bitro.settings.device``.

    Returns
    -------
    The fine-tuned model, as :func:`bitro.tl.transfer` returned it.

    Examples
    --------
    >>> tuned = bt.tl.load_adapters(bt.tl.load_model("base"), "adapters")  # doctest: +SKIP
    """
    path = Path(path)
    file = path / ADAPTER_CONFIG
    if not isinstance(base, BitroModel):
        msg = f"`base` must be a BitroModel (from `bt.tl.fit` or `bt.tl.load_model`), got {type(base).__name__}."
        raise TypeError(msg)
    finish_save(path)  # adapters saved into a shared folder and stopped between their renames
    if not file.is_file():
        msg = f"{path} holds no adapters: {ADAPTER_CONFIG} is missing. Write them with `model.save_adapters(path)`."
        raise FileNotFoundError(msg)
    try:
        config = json.loads(file.read_text())
        info = config["transfer"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        msg = f"The adapter config {file} is corrupted or was not written by `save_adapters` ({e!r})."
        raise ValueError(msg) from e
    got = model_fingerprint(base)
    if got != info["base_fingerprint"]:
        msg = (
            f"These adapters were trained on the base model {info['base_fingerprint']}, not on this one ({got}: other "
            "weights, genes or architecture). Load them onto the model they were fine-tuned from."
        )
        raise ValueError(msg)
    n = int(config.get("n_members", 1))
    if n != len(base.nets):
        msg = f"The adapters have {n} ensemble members, the base model {len(base.nets)}."
        raise ValueError(msg)
    tensors = read_weights(path / ADAPTER_WEIGHTS)
    sums = config.pop(CHECKSUMS, None)
    if sums is not None and file_digest(path / ADAPTER_WEIGHTS) != sums.get("weights_sha256"):
        msg = (
            f"The adapter weights {path / ADAPTER_WEIGHTS} do not match the checksum in {ADAPTER_CONFIG}: they were "
            "corrupted or changed; save the adapters again."
        )
        raise ValueError(msg)
    history = config.pop("history", [])
    config.pop("n_members", None)
    tuned = ModelConfig.from_dict(config, file)
    dev = resolve_device(device)
    nets = []
    arch = tuned.architecture.to_dict()  # the base's, with the target's bag-size statistics and genes
    for k, src in enumerate(base.nets):
        net = carry_genes(merged_net(src).cpu(), base.genes, tuned.genes, seed=0, **arch)
        inject(net, info["lora"], seed=0)
        own = {name[len(f"{k}.") :]: t for name, t in tensors.items() if name.startswith(f"{k}.")}
        expected = set(adapter_names(net, info["train_genes"]))
        if set(own) != expected:
            msg = (
                f"The adapter weights {path / ADAPTER_WEIGHTS} do not match their config (member {k}); save them again."
            )
            raise ValueError(msg)
        net.load_state_dict(own, strict=False)
        nets.append(net.to(dev).eval())
    return TransferredModel(nets, tuned, history, base.cell_reference)
