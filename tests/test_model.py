from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

from bitro.tl._bags import cell_data, collate, spot_bags  # noqa: E402
from bitro.tl.models._base import predict_ensemble  # noqa: E402
from bitro.tl.models._bitro import BitroArchitecture, BitroNet, cluster_loss, combine_parts  # noqa: E402


def _net(n_features=8, n_genes=5, readout="gene", **kw):
    torch.manual_seed(0)
    arch = BitroArchitecture(n_features=n_features, n_genes=n_genes, dim=16, gat_heads=2, transformer_heads=2, ff_dim=32, readout=readout, **kw)
    return BitroNet(arch).eval()


@pytest.fixture
def bags_cells(toy_tl):
    spots, cells = toy_tl
    data = cell_data(cells)
    bags = spot_bags(spots, data, context_radius=60.0, max_context=20)
    return [b for b in bags if b is not None], data


def test_prediction_does_not_depend_on_batch_mates(bags_cells):
    bags, data = bags_cells
    net = _net()
    with torch.no_grad():
        alone = [net(collate([bags[i]], data))[0][0] for i in (0, 5)]
        together, att, _ = net.outputs(collate(bags[:12], data))
        swapped, _, _ = net.outputs(collate([bags[5], *bags[6:12], bags[0]], data))
    torch.testing.assert_close(together[0], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[5], alone[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(swapped[-1], alone[0], rtol=1e-5, atol=1e-5)
    # attention sums to 1 over each bag's pooled cells, per gene
    bag = collate(bags[:12], data).pooled_bag
    sums = torch.zeros(12, att.shape[1]).index_add(0, bag, att)
    torch.testing.assert_close(sums, torch.ones_like(sums))


def test_predict_bags_independent_of_packing(bags_cells):
    bags, data = bags_cells
    net = _net()
    big, cells_big, n_big = predict_ensemble([net], bags, data, cell_scale=lambda y: y)
    small, cells_small, n_small = predict_ensemble([net], bags, data, tokens_per_batch=50, cell_scale=lambda y: y)
    np.testing.assert_allclose(big, small, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(n_big, n_small)
    np.testing.assert_allclose(cells_big, cells_small, rtol=1e-5, atol=1e-6)
    # each pooled cell gets n_pool x its attention x its bag's prediction, as the network's own forward pass gives
    with torch.no_grad():
        for bag in bags[:5]:
            y, att, _ = net.outputs(collate([bag], data))
            rows = bag[0].cells[: bag[0].n_pool]
            expected = bag[0].n_pool * att.numpy() * y.numpy()[0]
            row_of = np.cumsum(n_big > 0) - 1  # the cell values hold the covered cells only, in cell order
            np.testing.assert_allclose(cells_big[row_of[rows]], expected, rtol=1e-4, atol=1e-5)
            assert (n_big[rows] == 1).all()


def test_combine_parts_is_exact():
    net = _net(n_genes=3)
    h = torch.randn(10, 16)
    _, lse_whole, z_whole = net.attend(h, torch.zeros(10, dtype=torch.long), 1)
    _, lse_parts, z_parts = net.attend(h, torch.tensor([0] * 4 + [1] * 6), 2)
    lse, z = combine_parts(lse_parts, z_parts, torch.zeros(2, dtype=torch.long), 1)
    torch.testing.assert_close(lse, lse_whole)
    torch.testing.assert_close(z, z_whole)


def test_positions_are_physical_not_rescaled_per_bag(bags_cells):
    bags, data = bags_cells
    net = _net()
    batch = collate([bags[0]], data)
    with torch.no_grad():
        base = net(batch)[0]
        batch.pos = batch.pos * 2  # the same cells twice as far apart: a different bag
        stretched = net(batch)[0]
    assert not torch.allclose(base, stretched)


@pytest.mark.parametrize(
    ("readout", "gat_layers", "transformer_layers"), [("gene", 1, 1), ("shared", 1, 1), ("gene", 0, 2), ("gene", 2, 0)]
)
def test_gradients_reach_every_parameter(bags_cells, readout, gat_layers, transformer_layers):
    bags, data = bags_cells
    net = _net(readout=readout, gat_layers=gat_layers, transformer_layers=transformer_layers).train()
    batch = collate(bags[:6], data)
    y, cell_expr = net(batch)
    loss = (y**2).mean() + cluster_loss(cell_expr, batch.phenotype[batch.pool])
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing


def test_linear_layers_are_explicit_for_lora():
    net = _net()
    names = {n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)}
    for part in ("q", "k", "v", "o", "ff1", "ff2"):
        assert f"transformer.0.{part}" in names
    assert "in_proj" in names and "pos_proj" in names
    assert not any(isinstance(m, torch.nn.MultiheadAttention | torch.nn.TransformerEncoderLayer) for m in net.modules())


def test_cluster_loss():
    same = torch.full((4, 2), 1.0)
    assert cluster_loss(same, torch.tensor([0, 0, 1, 1])).item() == pytest.approx(0.0)
    spread = torch.tensor([[0.4, 0.4], [1.6, 1.6], [1.0, 1.0], [1.0, 1.0]])
    # cluster 0: each cell 0.6 from its cluster mean; cluster 1: on it; mean over cells and genes
    assert cluster_loss(spread, torch.tensor([0, 0, 1, 1])).item() == pytest.approx(0.36 / 2)
    # unknown phenotypes are left out
    assert cluster_loss(spread, torch.tensor([-1, -1, 1, 1])).item() == pytest.approx(0.0)


@pytest.mark.parametrize("readout", ["gene", "shared", "cell"])
def test_cells_average_to_their_bag(bags_cells, readout):
    """The cells' expression averages to the bag's prediction: plainly (pseudo-cells) or by attention ("cell")."""
    bags, data = bags_cells
    net = _net(readout=readout)
    batch = collate(bags[:6], data)
    with torch.no_grad():
        y, att, cell = net.outputs(batch)
    bag = batch.pooled_bag
    if readout == "cell":
        mean = torch.zeros_like(y).index_add(0, bag, att * cell)
        # each cell's value is its own: the readout of its embedding, not a share of the bag
        h = net.encode(batch)[batch.pool]
        torch.testing.assert_close(cell - net.size_term(batch.size)[bag], net.cell_readout(h))
    else:
        n = torch.bincount(bag, minlength=len(y)).to(y.dtype)
        mean = torch.zeros_like(y).index_add(0, bag, cell) / n[:, None]
    torch.testing.assert_close(mean, y, rtol=1e-4, atol=1e-5)
