"""The patch models M2ORT and CMRCNet (bitro.tl.models._m2ort / _cmrcnet) on hand-made patch batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

from safetensors.torch import load_file, save_file  # noqa: E402

from bitro.tl._bags import CellData, Seq, collate  # noqa: E402
from bitro.tl.models import get_model  # noqa: E402
from bitro.tl.models._cmrcnet import CMRCNet, CMRCNetArchitecture, bleep_loss  # noqa: E402
from bitro.tl.models._m2ort import M2ORTArchitecture, M2ORTNet, _turn, dihedral, patch_grid  # noqa: E402

TOKEN_UM = 16.0
#: A 32-px patch on a 4 x 4 grid at 3 levels (same field of view): blocks of 8, 4 and 2 px.
PIXELS = {"kind": "pixels", "grid": 4, "level_dims": [192, 48, 12], "token_um": TOKEN_UM, "scales": 3}
#: 3 levels of (fake) 16-dim encoder tokens on a 3 x 3 grid.
TOKENS = {"kind": "tokens", "grid": 3, "level_dims": [16, 16, 16], "token_um": TOKEN_UM, "scales": 3}
#: Small sizes, so the tests run in seconds.
SMALL_M2ORT = {"dim": 48, "depth": 2, "heads": 2, "dim_head": 16, "mlp_dim": 64}
SMALL_CMRC = {"token_dim": 32, "encoder_heads": 2, "projection_dim": 32, "gene_tokens": 4}


def features(layout: dict) -> dict:
    return {"patch_layout": {"fov": "same", "patch_px": 32, **layout}}


def blocks_of(image: np.ndarray, grid: int) -> np.ndarray:
    """``(grid * b, grid * b, 3)`` -> ``(grid**2, b * b * 3)``: row-major tokens of (y, x, channel) blocks."""
    b = image.shape[0] // grid
    return image.reshape(grid, b, grid, b, 3).transpose(0, 2, 1, 3, 4).reshape(grid * grid, b * b * 3)


def patch_data(layout: dict, n_bags: int, seed: int = 0, drop: dict | None = None):
    """A CellData of ``n_bags`` spot patches and their bags (one sequence each; ``drop``: bag -> missing tokens).

    Pixel patches are a colour per spot plus noise, at each level (so targets can be a function of the pixels).
    Returns the data, the bags and each spot's colour ``(n_bags, 3)``.
    """
    rng = np.random.default_rng(seed)
    g, dims = layout["grid"], layout["level_dims"]
    colours = rng.uniform(30, 220, (n_bags, 3))
    rows, xy, bags = [], [], []
    centre_offset = (g - 1) / 2
    for b in range(n_bags):
        if layout["kind"] == "pixels":
            levels = []
            for d in dims:
                side = int(np.sqrt(d // 3)) * g
                img = colours[b] + rng.normal(0, 20, (side, side, 3))
                levels.append(blocks_of(np.clip(img, 0, 255).round(), g))
            rows.append(np.concatenate(levels, axis=1).astype(np.uint8))
        else:
            tok = rng.normal(0, 0.5, (g * g, sum(dims)))
            for start in np.cumsum([0, *dims[:-1]]):  # each level's first 3 features carry the colour
                tok[:, start : start + 3] += (colours[b] - 125) / 50
            rows.append(tok.astype(np.float16))
        centre = np.array([1000.0 * b, 300.0])
        for t in range(g * g):
            r, c = divmod(t, g)
            xy.append(centre + [(c - centre_offset) * TOKEN_UM, (r - centre_offset) * TOKEN_UM])
        cells = np.arange(b * g * g, (b + 1) * g * g)
        if drop and b in drop:
            cells = np.delete(cells, drop[b])
        bags.append([Seq(cells, len(cells), centre)])
    n = n_bags * g * g
    data = CellData(
        features=np.concatenate(rows),
        xy_um=np.asarray(xy),
        sample=np.array(["s1"] * (n // 2) + ["s2"] * (n - n // 2)),
        spot_id=np.array([""] * n, dtype=object),
        phenotype=-np.ones(n, dtype=np.int64),
        adjacency=sp.csr_matrix((n, n)),
        pixel_size={"s1": 1.0, "s2": 1.0},
    )
    return data, bags, colours


def targets_of(colours: np.ndarray, n_genes: int, seed: int = 1) -> np.ndarray:
    """z-scored genes that are a smooth function of each spot's colour."""
    rng = np.random.default_rng(seed)
    c = (colours - colours.mean(0)) / colours.std(0)
    y = np.tanh(c @ rng.normal(size=(3, n_genes)))
    return ((y - y.mean(0)) / y.std(0)).astype(np.float32)


def m2ort(layout: dict, n_genes: int = 5, **options) -> M2ORTNet:
    arch = M2ORTArchitecture.for_data(
        n_features=sum(layout["level_dims"]), n_genes=n_genes, bag_sizes=[0.0], features=features(layout),
        **{**SMALL_M2ORT, **options},
    )  # fmt: skip
    return M2ORTNet(arch)


def cmrcnet(layout: dict, n_genes: int = 5, **options) -> CMRCNet:
    arch = CMRCNetArchitecture.for_data(
        n_features=sum(layout["level_dims"]), n_genes=n_genes, bag_sizes=[0.0], features=features(layout),
        **{**SMALL_CMRC, **options},
    )  # fmt: skip
    return CMRCNet(arch)


def with_bank(net: CMRCNet, n: int = 20, seed: int = 3) -> CMRCNet:
    net.prepare(torch.as_tensor(np.random.default_rng(seed).normal(size=(n, net.arch.n_genes)), dtype=torch.float32))
    return net


NETS = [
    pytest.param(lambda lay, **o: m2ort(lay, **o), PIXELS, {}, id="m2ort-pixels"),
    pytest.param(lambda lay, **o: m2ort(lay, **o), TOKENS, {}, id="m2ort-tokens"),
    pytest.param(lambda lay, **o: m2ort(lay, **o), TOKENS, {"qkv": "per_level"}, id="m2ort-per-level"),
    pytest.param(lambda lay, **o: with_bank(cmrcnet(lay, **o)), PIXELS, {}, id="cmrcnet-pixels"),
    pytest.param(lambda lay, **o: with_bank(cmrcnet(lay, **o)), TOKENS, {"levels": "all"}, id="cmrcnet-tokens"),
    pytest.param(lambda lay, **o: cmrcnet(lay, **o), TOKENS, {"predict": "regression"}, id="cmrcnet-regression"),
    pytest.param(
        lambda lay, **o: with_bank(cmrcnet(lay, **o)),
        PIXELS,
        {"variant": "published", **SMALL_CMRC, "encoder_depth": 1, "fusion_depth": 2, "tied_fusion": False},
        id="cmrcnet-published-untied",
    ),
]


# -- registry and architecture -------------------------------------------------------------------------------------
def test_registry_and_table_defaults():
    for name, arch in (("m2ort", M2ORTArchitecture), ("cmrcnet", CMRCNetArchitecture)):
        spec = get_model(name)
        assert spec.architecture is arch
        assert arch.input_table == "patches" and arch.default_rep == "bitro_patches"


@pytest.mark.parametrize("arch", [M2ORTArchitecture, CMRCNetArchitecture])
def test_layout_from_the_table(arch):
    a = arch.for_data(n_features=252, n_genes=7, bag_sizes=[1.0], features=features(PIXELS))
    assert (a.kind, a.grid, a.token_um, a.level_dims, a.blocks) == ("pixels", 4, TOKEN_UM, [192, 48, 12], [8, 4, 2])
    assert arch.from_dict(json.loads(json.dumps(a.to_dict()))) == a  # the saved config reads back
    probe = arch.for_data(n_features=1, n_genes=1, bag_sizes=[0.0])  # options only (bt.tl.fit's early check)
    assert probe.level_dims == []
    with pytest.raises(ValueError, match="no patch layout"):
        (M2ORTNet if arch is M2ORTArchitecture else CMRCNet)(probe)
    with pytest.raises(ValueError, match=r"model='(m2ort|cmrcnet)' reads spot patches: run `bt.pp.spot_patches"):
        arch.for_data(n_features=30, n_genes=7, bag_sizes=[1.0], features={"feature_key": "X_bitro", "n_features": 30})
    with pytest.raises(ValueError, match="252 features but its layout lists"):
        arch.for_data(n_features=252, n_genes=7, bag_sizes=[1.0], features=features({**PIXELS, "level_dims": [192]}))
    with pytest.raises(ValueError, match="square RGB blocks"):
        arch.for_data(n_features=50, n_genes=7, bag_sizes=[1.0], features=features({**PIXELS, "level_dims": [50]}))
    with pytest.raises(TypeError, match="Unknown option"):  # layout fields are the table's, not options
        arch.for_data(n_features=252, n_genes=7, bag_sizes=[1.0], features=features(PIXELS), grid=7)
    with pytest.raises(ValueError, match="is not a variant"):
        arch.for_data(n_features=1, n_genes=1, bag_sizes=[0.0], variant="huge")


def test_m2ort_variants_and_options():
    def make(**options):
        return M2ORTArchitecture.for_data(
            n_features=48, n_genes=3, bag_sizes=[0.0], features=features(TOKENS), **options
        )

    a = make()
    assert (a.variant, a.dim, a.depth, a.heads, a.dim_head, a.mlp_dim, a.dropout) == ("cpu", 192, 4, 4, 32, 384, 0.0)
    b = make(variant="published", depth=2)
    assert (b.dim, b.depth, b.heads, b.dim_head, b.mlp_dim) == (768, 2, 12, 64, 512)
    assert make(variant="large").dim == 1152 and make(variant="small").heads == 9
    with pytest.raises(ValueError, match="qkv='diagonal' is not supported"):
        make(qkv="diagonal")
    with pytest.raises(ValueError, match="divisible by the number of levels"):
        make(dim=100)
    with pytest.raises(ValueError, match="dropout"):
        make(dropout=1.5)
    with pytest.raises(TypeError, match="`depth` must be an integer"):
        make(depth=2.5)
    one_level = features({**TOKENS, "level_dims": [48]})
    with pytest.raises(ValueError, match="qkv='cross_level' takes queries, keys and values from 3 levels"):
        M2ORTArchitecture.for_data(n_features=48, n_genes=3, bag_sizes=[0.0], features=one_level)
    a1 = M2ORTArchitecture.for_data(n_features=48, n_genes=3, bag_sizes=[0.0], features=one_level, qkv="per_level")
    assert a1.n_levels == 1


def test_cmrcnet_variants_and_options():
    def make(layout=TOKENS, **options):
        n = sum(layout["level_dims"])
        return CMRCNetArchitecture.for_data(
            n_features=n, n_genes=3, bag_sizes=[0.0], features=features(layout), **options
        )

    a = make()
    assert (a.variant, a.token_dim, a.encoder_depth, a.fusion_depth, a.projection_dim) == ("cpu", 256, 0, 1, 256)
    faithful = {"mask_ratio": 0.5, "temperature": 1.0, "tied_fusion": True, "detach_target": False, "k": 50}
    assert {k: getattr(a, k) for k in faithful} == faithful and a.predict == "retrieval"
    assert make(PIXELS).encoder_depth == 2  # the CPU variant needs some context on raw pixels
    p = make(variant="published")
    assert (p.token_dim, p.encoder_depth, p.encoder_heads, p.fusion_depth) == (768, 8, 8, 2)
    for bad, match in (
        ({"mask_ratio": 1.5}, "mask_ratio"),
        ({"mask_ratio": -0.1}, "mask_ratio"),
        ({"temperature": 0.0}, "temperature"),
        ({"predict": "knn"}, "predict='knn'"),
        ({"levels": "last"}, "levels='last'"),
        ({"projection_dim": 20}, "multiple of 8"),
        ({"k": 0}, "`k`"),
        ({"token_dim": 30, "encoder_depth": 1, "encoder_heads": 4}, "divisible by `encoder_heads`"),
    ):
        with pytest.raises(ValueError, match=match):
            make(**bad)
    with pytest.raises(TypeError, match="tied_fusion"):
        make(tied_fusion="yes")


# -- tokens on the grid and augmentation ---------------------------------------------------------------------------
def test_patch_grid_places_tokens_and_masks_missing_ones():
    data, bags, _ = patch_data(TOKENS, 3, drop={1: [0, 4]})
    batch = collate(bags, data)
    x, mask = patch_grid(batch, 3, TOKEN_UM)
    assert x.shape == (3, 9, 48) and x.dtype == torch.float16
    assert mask.sum(1).tolist() == [9, 7, 9] and not mask[1, 0] and not mask[1, 4]
    assert (x[1, 0] == 0).all()
    torch.testing.assert_close(x[2], torch.from_numpy(data.features[18:27]))  # row-major slots
    with pytest.raises(ValueError, match="do not fall on the model's 3 x 3 grid of 8 um tokens"):
        patch_grid(batch, 3, 8.0)


@pytest.mark.parametrize("k", range(8))
def test_dihedral_turns_pixel_blocks_with_the_grid(k):
    rng = np.random.default_rng(k)
    g, sides = 4, [8, 4, 2]
    images = [rng.integers(0, 256, (g * s, g * s, 3)) for s in sides]
    tokens = torch.as_tensor(np.concatenate([blocks_of(im, g) for im in images], axis=1))[None]
    mask = torch.zeros(1, g * g, dtype=torch.bool)
    mask[0, 1] = True  # slot (row 0, col 1)
    got, got_mask = dihedral(tokens, mask, g, sides, torch.tensor([k]))
    turned = [_turn(torch.as_tensor(im), k, (0, 1)).numpy() for im in images]  # the whole patch turned
    np.testing.assert_array_equal(got[0].numpy(), np.concatenate([blocks_of(im, g) for im in turned], axis=1))
    where = np.zeros((g, g), bool)
    where[0, 1] = True
    np.testing.assert_array_equal(got_mask[0].numpy(), _turn(torch.as_tensor(where), k, (0, 1)).numpy().ravel())


def test_m2ort_is_not_invariant_and_augments_in_training():
    net = m2ort(PIXELS)
    data, bags, _ = patch_data(PIXELS, 1)
    flipped = CellData(**{**data.__dict__})
    x, mask = patch_grid(collate(bags, data), 4, TOKEN_UM)
    views = []
    for k in range(8):
        turned, _ = dihedral(x, mask, 4, [8, 4, 2], torch.tensor([k]))
        flipped.features = turned[0].numpy()
        with torch.no_grad():
            views.append(net.eval()(collate(bags, flipped))[0])
    assert (views[4] - views[0]).abs().max() > 1e-3  # a flipped patch is another input (augment off in eval)
    net.train()  # dropout 0: training differs from evaluation only by the random turn
    with torch.no_grad():
        for _ in range(4):
            y, cell_values = net(collate(bags, data))
            assert y.shape == (1, 5) and cell_values.shape == (16, 5)
            assert min(float((y - v).abs().max()) for v in views) < 1e-5
    off = m2ort(PIXELS, augment=False).train()
    with torch.no_grad():
        torch.testing.assert_close(off(collate(bags, data))[0], off.eval()(collate(bags, data))[0])


# -- both models -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("make", "layout", "options"), NETS)
def test_shapes_invariance_missing_tokens_and_safetensors(make, layout, options, tmp_path):
    torch.manual_seed(0)
    net = make(layout, **options).eval()
    data, bags, _ = patch_data(layout, 6, drop={2: [0, 1, 5]})
    batch = collate(bags, data)
    with torch.no_grad():
        y, cell_values = net(batch)
    assert y.shape == (6, 5) and torch.isfinite(y).all()
    assert cell_values.shape == (len(batch.x), 5)
    torch.testing.assert_close(cell_values, y[batch.pooled_bag])  # a token carries its spot's prediction
    with torch.no_grad():  # a bag's prediction does not depend on the other bags of its batch
        alone = torch.cat([net(collate([bag], data))[0] for bag in bags])
        mixed = net(collate([bags[4], bags[2], bags[0]], data))[0]
    torch.testing.assert_close(alone, y, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed, y[[4, 2, 0]], atol=1e-5, rtol=1e-4)
    # tokens dropped at random, as the training loop does
    dropped = collate(bags, data, rng=np.random.default_rng(0), cell_dropout=0.5)
    net.train()
    loss, parts = net.loss(dropped, torch.randn(6, 5))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in parts.values())
    # weights through safetensors into a fresh network
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.manual_seed(1)
    fresh = type(net)(net.arch)
    fresh.load_state_dict(load_file(str(tmp_path / "w.safetensors")), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(batch)[0], net.eval()(batch)[0])


def test_m2ort_overfits_pixels():
    torch.manual_seed(0)
    data, bags, colours = patch_data(PIXELS, 16)
    target = torch.as_tensor(targets_of(colours, 5))
    net = m2ort(PIXELS, augment=False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    batch = collate(bags, data)
    losses = []
    for _ in range(150):
        loss, _ = net.loss(batch, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 20, (losses[0], losses[-1])


def test_cmrcnet_learns_retrieval_and_regression():
    layout = TOKENS
    torch.manual_seed(0)
    data, bags, colours = patch_data(layout, 16)
    target = torch.as_tensor(targets_of(colours, 5))
    batch = collate(bags, data)
    net = cmrcnet(layout, predict="regression", k=1)
    net.prepare(target)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    first = None
    for _ in range(150):
        net.train()
        loss, parts = net.loss(batch, target)
        first = first or {k: v.item() for k, v in parts.items()}
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = {k: v.item() for k, v in parts.items()}
    assert last["mse"] < first["mse"] / 10, (first, last)
    assert last["contrastive"] < first["contrastive"] / 5, (first, last)
    with torch.no_grad():  # each training spot's image finds its own expression in the bank
        e_img = net.eval().image_embedding(*net.tokens(batch))
        retrieved = net.retrieve(e_img)
    assert float(((retrieved - target) ** 2).mean()) < 0.2


def test_bleep_loss_and_temperature_quirk():
    torch.manual_seed(0)
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    at_one = bleep_loss(a, b, 1.0, False)
    torch.testing.assert_close(at_one, bleep_loss(a, b, 1.0, True))  # harmless at τ = 1
    assert at_one.shape == (6,) and (at_one > 0).all()
    assert not torch.allclose(bleep_loss(a, b, 0.5, False), bleep_loss(a, b, 0.5, True))
    logits = b @ a.T / 0.5
    targets = torch.softmax((a @ a.T + b @ b.T) / 2 / 0.5, dim=-1)
    expected = (torch.nn.functional.cross_entropy(logits, targets, reduction="none") + torch.nn.functional.cross_entropy(
        logits.T, targets.T, reduction="none"
    )) / 2  # fmt: skip
    torch.testing.assert_close(bleep_loss(a, b, 0.5, True), expected)


def test_cmrcnet_bank():
    net = cmrcnet(TOKENS).eval()
    data, bags, _ = patch_data(TOKENS, 3)
    assert net.bank.shape == (0, 5)
    with pytest.raises(ValueError, match="the retrieval bank is empty: the network was not trained with bitro.tl.fit"):
        net(collate(bags, data))
    with_bank(net, n=4)
    with torch.no_grad():
        y = net(collate(bags, data))[0]
        keys = net.bank_keys()
        assert net.bank_keys() is keys  # cached in evaluation mode
    torch.testing.assert_close(y, net.bank.mean(0).expand(3, -1))  # k=50 > 4 bank rows: all of them
    net.train()
    assert net._keys is None
    state = net.state_dict()
    other = cmrcnet(TOKENS)
    other.load_state_dict(state)  # the bank takes the saved row count
    assert other.bank.shape == (4, 5)
    with pytest.raises(ValueError, match="The retrieval bank holds 3 genes but the model predicts 5"):
        other.load_state_dict({**state, "bank": torch.zeros(4, 3)})
    with pytest.raises(ValueError, match="spots x 5 genes"):
        other.prepare(torch.zeros(4, 3))


# -- through bitro's training loop ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "layout"),
    [(lambda lay: m2ort(lay), PIXELS), (lambda lay: cmrcnet(lay), TOKENS), (lambda lay: cmrcnet(lay), PIXELS)],
    ids=["m2ort", "cmrcnet-tokens", "cmrcnet-pixels"],
)
def test_train_network(make, layout, tmp_path):
    from bitro.tl._train import TrainOptions, train_network
    from bitro.tl.models._base import predict_ensemble

    data, bags, colours = patch_data(layout, 12)
    yz = targets_of(colours, 5)
    options = TrainOptions(lr=1e-3, weight_decay=0.0, batch_size=4, cell_dropout=0.1, patience=5, max_cells=10_000)
    train_idx, val_idx = np.arange(9), np.arange(9, 12)
    common = {"options": options, "seed": 0, "epochs": 3, "device": "cpu", "desc": "test", "prepare": True}
    torch.manual_seed(0)
    net, history = train_network(make(layout), bags, yz, data, train_idx, val_idx, folder=tmp_path, **common)
    assert len(history["train_loss"]) == 3 and len(history["val_pcc_gene"]) == 3
    assert all(np.isfinite(history["train_loss"]))
    y, _, _ = predict_ensemble([net], bags, data)
    assert y.shape == (12, 5) and np.isfinite(y).all()
    if isinstance(net, CMRCNet):
        assert net.bank.shape == (9, 5)
        torch.testing.assert_close(net.bank, torch.as_tensor(yz[train_idx]))
    # a second run with the same data and settings resumes from the checkpoint (the bank loads with the weights)
    torch.manual_seed(0)
    again, _ = train_network(make(layout), bags, yz, data, train_idx, val_idx, folder=tmp_path, **common)
    np.testing.assert_allclose(predict_ensemble([again], bags, data)[0], y, atol=1e-5)


@pytest.mark.parametrize("detach", [False, True])
def test_cmrcnet_reconstruction_target_and_fusion_options(detach):
    torch.manual_seed(0)
    net = cmrcnet(TOKENS, detach_target=detach, fusion_depth=2).train()
    assert len(net.fusion) == 1  # tied: one block applied twice
    assert len(cmrcnet(TOKENS, fusion_depth=2, tied_fusion=False).fusion) == 2
    data, bags, colours = patch_data(TOKENS, 4)
    _, parts = net.loss(collate(bags, data), torch.as_tensor(targets_of(colours, 5)))
    parts["reconstruction"].backward()
    grad = net.image_head.projection.weight.grad
    assert (grad is None or float(grad.abs().max()) == 0.0) == detach  # the target E_img gets gradients unless detached
    assert float(net.snn[0].weight.grad.abs().max()) > 0  # the gene tokens always do
