from __future__ import annotations

from pathlib import Path

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import bitro as bt
from bitro._constants import Key

IMAGES = Path(__file__).parent / "_images"
PX = 0.5  # um per pixel of the synthetic section
RADIUS = 18.0


def _section_sdata(samples=("s1",)):
    """A small section per sample: a pink image with a darker blob, 5x4 spots, counts, predictions, cells."""
    from spatialdata import SpatialData

    from bitro.io._build import image_element, spots_element, spots_table

    rng = np.random.default_rng(0)
    genes = ["EPCAM", "ERBB2", "KRT19", "PTPRC"]
    images, shapes, tables, cell_tables = {}, {}, [], []
    for sample in samples:
        yy, xx = np.mgrid[0:240, 0:300]
        blob = np.exp(-((xx - 120) ** 2 + (yy - 110) ** 2) / 3000.0)
        img = np.stack([235 - 80 * blob, 190 - 120 * blob, 215 - 40 * blob]).astype(np.uint8)
        images[Key.image(sample)] = image_element(img, sample, PX, scale_factors=[2])
        gx, gy = np.meshgrid(np.arange(5) * 50 + 50, np.arange(4) * 50 + 40)
        xy = np.column_stack([gx.ravel(), gy.ravel()]).astype(float)
        ids = [f"{i}x{j}" for i, j in zip(gx.ravel() // 50, gy.ravel() // 50, strict=True)]
        shapes[Key.spots(sample)] = spots_element(xy, RADIUS, ids, sample, PX)
        counts = rng.poisson(5, (len(xy), len(genes))).astype(float)
        counts[:, 0] += np.round(40 * np.exp(-((xy[:, 0] - 120) ** 2 + (xy[:, 1] - 110) ** 2) / 3000.0))
        a = ad.AnnData(counts, obs=pd.DataFrame({Key.SAMPLE: sample}, index=ids), var=pd.DataFrame(index=genes))
        a.obsm[Key.SPATIAL] = xy
        tables.append(a)
        cxy = xy[rng.integers(0, len(xy), 60)] + rng.uniform(-12, 12, (60, 2))
        cells = ad.AnnData(
            np.zeros((60, 1)),
            obs=pd.DataFrame(
                {Key.SAMPLE: sample, Key.PHENOTYPE: pd.Categorical(rng.integers(0, 3, 60).astype(str))},
                index=[f"{sample}_c{i}" for i in range(60)],
            ),
        )
        cells.obsm[Key.SPATIAL] = cxy
        cell_tables.append(cells)
    table = spots_table(tables)
    predicted = np.log1p(1e4 * table.X / table.X.sum(1, keepdims=True)) * 0.8 + 0.5
    table.obsm[Key.PREDICTED] = pd.DataFrame(predicted[:, :3], index=table.obs_names, columns=genes[:3])  # not PTPRC
    table.uns[Key.UNS] = {"predict": {"scale": "cp10k"}}
    cells = ad.concat(cell_tables)
    cells.obs[Key.PHENOTYPE] = pd.Categorical(cells.obs[Key.PHENOTYPE])
    # the cell expression table of bt.tl.predict: the first cell of each section left out (no bag)
    covered = cells[[i % 60 != 0 for i in range(cells.n_obs)]]
    expr = ad.AnnData(rng.uniform(0, 1, (covered.n_obs, 3)), obs=covered.obs.copy(), var=pd.DataFrame(index=genes[:3]))
    expr.obsm[Key.SPATIAL] = covered.obsm[Key.SPATIAL]
    expr.uns[Key.UNS] = {"predict": {"scale": "cp10k"}}
    tables = {Key.SPOTS_TABLE: table, Key.CELLS_TABLE: cells, Key.PREDICTED_CELLS_TABLE: expr}
    return SpatialData(images=images, shapes=shapes, tables=tables)


@pytest.fixture
def sdata():
    return _section_sdata()


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _spot_collection(ax):
    from matplotlib.collections import EllipseCollection

    (coll,) = [c for c in ax.collections if isinstance(c, EllipseCollection)]
    return coll


def test_expression_draws_observed_and_predicted(sdata):
    table = sdata.tables[Key.SPOTS_TABLE]
    axs = bt.pl.expression(sdata, "EPCAM")
    x = table.X
    observed = np.log1p(1e4 * x[:, 0] / x.sum(1))
    assert [ax.get_title() for ax in axs] == ["EPCAM — observed", "EPCAM — predicted\nPearson r = 1.00 over 20 spots"]
    for ax, expected in zip(axs, [observed, table.obsm[Key.PREDICTED]["EPCAM"]], strict=True):
        coll = _spot_collection(ax)
        np.testing.assert_allclose(coll.get_array(), expected)
        np.testing.assert_allclose(coll.get_offsets(), table.obsm[Key.SPATIAL])
        np.testing.assert_allclose(coll.get_widths(), 2 * RADIUS)
        (im,) = ax.images  # the H&E under the spots, in section pixels
        x0, x1, y1, y0 = im.get_extent()
        assert x0 <= 50 - RADIUS and x1 >= 250 + RADIUS and y0 <= 40 - RADIUS and y1 >= 190 + RADIUS
        assert not ax.axison
        assert ax.yaxis_inverted()
        bars = [a for a in ax.artists if a.__class__.__name__ == "AnchoredSizeBar"]
        assert len(bars) == 1
    assert len(axs[0].figure.axes) == 4  # two panels, two colourbars


def test_expression_picks_a_coarse_level_for_the_image(sdata):
    ax = bt.pl.expression(sdata, "EPCAM", image_size=100)[0]
    (im,) = ax.images
    assert im.get_array().shape[1] < 150  # scale1 of a 300 px wide image
    ax = bt.pl.expression(sdata, "EPCAM", image_size=10_000)[0]
    assert ax.images[0].get_array().shape[1] > 200


def test_expression_cells_overlay(sdata):
    expr = sdata.tables[Key.PREDICTED_CELLS_TABLE]
    axs = bt.pl.expression(sdata, "ERBB2", cells=True)
    assert len(axs) == 3 and axs[2].get_title() == "ERBB2 — predicted cells"
    (points,) = axs[2].collections
    values = expr[:, "ERBB2"].X[:, 0]
    assert len(values) == 59  # the cell in no bag is not in the table
    order = np.argsort(values)  # highest drawn last
    np.testing.assert_allclose(points.get_offsets(), expr.obsm[Key.SPATIAL][order])
    np.testing.assert_allclose(points.get_array(), values[order])


def test_expression_prediction_table_without_observed(sdata):
    # a slide without measured expression: the prediction table of bt.tl.predict, drawn without an observed panel
    spots = sdata.tables[Key.SPOTS_TABLE]
    pred = ad.AnnData(spots.obsm[Key.PREDICTED].to_numpy(), obs=spots.obs.copy())
    pred.var_names = list(spots.obsm[Key.PREDICTED].columns)
    pred.obsm[Key.SPATIAL] = spots.obsm[Key.SPATIAL]
    pred.uns[Key.UNS] = {"predict": {"scale": "cp10k", "predictions": "X"}}
    sdata.tables["bitro_spots"] = pred
    axs = bt.pl.expression(sdata, "EPCAM", table_key="bitro_spots", cells=True)
    assert [ax.get_title() for ax in axs] == ["EPCAM — predicted", "EPCAM — predicted cells"]  # nothing to correlate
    np.testing.assert_allclose(_spot_collection(axs[0]).get_array(), pred[:, "EPCAM"].X[:, 0])


def test_expression_anndata_without_image(sdata):
    table = sdata.tables[Key.SPOTS_TABLE]
    axs = bt.pl.expression(table, "KRT19")
    assert not axs[0].images
    # radius from the spacing: a quarter of the 50 px pitch
    np.testing.assert_allclose(_spot_collection(axs[0]).get_widths(), 2 * 12.5)


def test_expression_into_given_axes(sdata):
    _, axs = plt.subplots(1, 2)
    assert list(bt.pl.expression(sdata, "EPCAM", axs=axs)) == list(axs)
    with pytest.raises(ValueError, match="3 panel"):
        bt.pl.expression(sdata, "EPCAM", cells=True, axs=axs)


def test_expression_matches_baseline_image(sdata, tmp_path):
    from matplotlib.testing.compare import compare_images

    axs = bt.pl.expression(sdata, "EPCAM")
    fig = axs[0].figure
    fig.set_size_inches(8, 3)
    for ax in fig.axes:  # compare the drawing, not the font rendering
        ax.set_title("")
        if not ax.axison:
            continue
        ax.set_yticks([])
        ax.set_ylabel("")
    for ax in axs:
        for bar in list(ax.artists):
            bar.remove()
    actual = tmp_path / "expression.png"
    fig.savefig(actual, dpi=60)
    # to refresh the baseline after an intended change: copy `actual` to tests/_images/expression.png
    assert compare_images(str(IMAGES / "expression.png"), str(actual), tol=15) is None


def test_expression_bad_inputs(sdata):
    with pytest.raises(KeyError, match=r"EPCAM"):
        bt.pl.expression(sdata, "EPCM")
    with pytest.raises(KeyError, match=r"no prediction.*bt\.tl\.predict"):
        bt.pl.expression(sdata, "PTPRC")
    with pytest.raises(KeyError, match=r"Run `bt\.tl\.predict` first"):
        bt.pl.expression(sdata, "EPCAM", layer="other")
    with pytest.raises(KeyError, match=r"Available samples: \['s1'\]"):
        bt.pl.expression(sdata, "EPCAM", sample="s9")
    table = sdata.tables[Key.SPOTS_TABLE].copy()
    del table.obsm[Key.SPATIAL]
    with pytest.raises(KeyError, match="spatial coordinates"):
        bt.pl.expression(table, "EPCAM")
    with pytest.raises(ValueError, match="cell expression table"):
        bt.pl.expression(sdata.tables[Key.SPOTS_TABLE], "EPCAM", cells=True)
    del sdata.tables[Key.PREDICTED_CELLS_TABLE]
    with pytest.raises(ValueError, match=r"bt\.tl\.predict"):
        bt.pl.expression(sdata, "EPCAM", cells=True)
    assert not plt.get_fignums()  # nothing drawn before the checks failed


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_expression_needs_sample_when_several():
    sdata = _section_sdata(("s1", "s2"))
    with pytest.raises(ValueError, match=r"choose one with `sample=`"):
        bt.pl.expression(sdata, "EPCAM")
    axs = bt.pl.expression(sdata, "EPCAM", sample="s2")
    np.testing.assert_allclose(
        _spot_collection(axs[1]).get_array(), sdata.tables[Key.SPOTS_TABLE].obsm[Key.PREDICTED]["EPCAM"][20:]
    )


def test_phenotypes_colours_each_category(sdata):
    cells = sdata.tables[Key.CELLS_TABLE]
    palette = ["#ff0000", "#00ff00", "#0000ff"]
    ax = bt.pl.phenotypes(sdata, palette=palette)
    assert len(ax.images) == 1
    labels = cells.obs[Key.PHENOTYPE].to_numpy()
    for coll, cat, color in zip(ax.collections, ["0", "1", "2"], palette, strict=True):
        np.testing.assert_allclose(coll.get_offsets(), cells.obsm[Key.SPATIAL][labels == cat])
        np.testing.assert_allclose(coll.get_facecolor()[0, :3], plt.matplotlib.colors.to_rgb(color))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["0", "1", "2"]


def test_phenotypes_uses_stored_colours_and_checks_input(sdata):
    cells = sdata.tables[Key.CELLS_TABLE]
    cells.uns[f"{Key.PHENOTYPE}_colors"] = ["#111111", "#222222", "#333333"]
    ax = bt.pl.phenotypes(cells)
    assert not ax.images
    np.testing.assert_allclose(ax.collections[2].get_facecolor()[0, :3], plt.matplotlib.colors.to_rgb("#333333"))
    with pytest.raises(KeyError, match=r"bt\.pp\.phenotypes"):
        bt.pl.phenotypes(sdata, phenotype_key="cluster")
    with pytest.raises(ValueError, match="one per category"):
        bt.pl.phenotypes(sdata, palette=["red"])
    with pytest.raises(KeyError, match="Available samples"):
        bt.pl.phenotypes(sdata, sample="nope")


def test_metrics_histogram_names_best_and_worst(sdata):
    pcc = pd.Series(np.linspace(-0.2, 0.7, 10), index=[f"G{i}" for i in range(10)])
    ax = bt.pl.metrics(pcc, n_genes=2)
    assert sum(p.get_height() for p in ax.patches) == 10
    texts = {t.get_text().split("\n")[0]: t.get_text() for t in ax.texts}
    assert "G9  0.70" in texts["best"] and "G8" in texts["best"] and "G7" not in texts["best"]
    assert texts["worst"].split("\n")[1] == "G0  -0.20"
    mean_line = [line for line in ax.lines if line.get_linestyle() == "--"][0]
    assert mean_line.get_xdata()[0] == pytest.approx(0.25)


def test_metrics_after_evaluate(sdata):
    with pytest.raises(KeyError, match=r"bt\.tl\.evaluate"):
        bt.pl.metrics(sdata)
    bt.tl.evaluate(sdata)
    ax = bt.pl.metrics(sdata, n_genes=1)
    assert sum(p.get_height() for p in ax.patches) == 3  # PTPRC was not predicted
    with pytest.raises(ValueError, match="n_genes"):
        bt.pl.metrics(sdata, n_genes=-1)


def test_training_curves():
    history = {"train": [1.0, 0.6, 0.5, 0.45], "val": [1.1, 0.8, 0.85, 0.9]}
    ax = bt.pl.training(history)
    train, val = ax.lines[:2]
    np.testing.assert_allclose(train.get_xdata(), [1, 2, 3, 4])
    np.testing.assert_allclose(val.get_ydata(), history["val"])
    kept = [line for line in ax.lines if line.get_linestyle() == ":"][0]
    assert kept.get_xdata()[0] == 2  # lowest validation loss
    frame = pd.DataFrame({"epoch": [0, 1], "train_loss": [2.0, 1.0]})
    ax = bt.pl.training(frame, log=True)
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [0, 1])
    assert ax.get_yscale() == "log"


def test_training_draws_every_member_of_a_fitted_model():
    class Fitted:  # the shape of bt.tl.BitroModel.history: one dict per ensemble member
        history = [
            {
                "train_loss": [0.9, 0.5, 0.4],
                "val_mse": [1.0, 0.8, 0.9],
                "val_pcc_gene": [0.1, 0.2, 0.15],
                "best_epoch": 2,
            },
            {"train_loss": [0.8, 0.6], "val_mse": [0.9, 0.95], "val_pcc_gene": [0.12, 0.11], "best_epoch": 1},
        ]

    ax = bt.pl.training(Fitted())
    solid = [line for line in ax.lines if line.get_linestyle() == "-"]
    assert len(solid) == 4  # train_loss and val_mse of two members
    (score_ax,) = [a for a in ax.figure.axes if a is not ax]
    np.testing.assert_allclose(score_ax.lines[1].get_ydata(), [0.12, 0.11])  # scores on the right axis
    kept = sorted(line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == ":")
    assert kept == [1, 2]
    assert "2 ensemble members" in ax.get_title()


def test_training_checks_input():
    with pytest.raises(TypeError, match=r"bt\.tl\.fit"):
        bt.pl.training([1, 2, 3])
    with pytest.raises(ValueError, match=r"bt\.tl\.fit"):
        bt.pl.training({"train": []})


def test_expression_without_pixel_size_has_no_scale_bar(sdata):
    from spatialdata.transformations import remove_transformation

    remove_transformation(sdata.images[Key.image("s1")], Key.microns("s1"))
    ax = bt.pl.expression(sdata, "EPCAM")[0]
    assert len(ax.images) == 1
    assert not [a for a in ax.artists if a.__class__.__name__ == "AnchoredSizeBar"]


def test_expression_shares_one_colour_scale_by_default(sdata):
    table = sdata.tables[Key.SPOTS_TABLE]
    x = table.X
    observed = np.log1p(1e4 * x[:, 1] / x.sum(1))
    predicted = table.obsm[Key.PREDICTED]["ERBB2"].to_numpy()
    cells = sdata.tables[Key.PREDICTED_CELLS_TABLE][:, "ERBB2"].X[:, 0]
    axs = bt.pl.expression(sdata, "ERBB2", cells=True)
    limits = [_spot_collection(ax).get_clim() for ax in axs[:2]] + [axs[2].collections[0].get_clim()]
    expected = (min(observed.min(), predicted.min(), cells.min()), max(observed.max(), predicted.max(), cells.max()))
    for lim in limits:  # the same vmin and vmax on every panel, spanning all values drawn
        np.testing.assert_allclose(lim, expected)
    cbars = [ax for ax in axs[0].figure.axes if ax not in axs]
    assert len(cbars) == 3 and all(cb.get_ylabel().endswith("log1p CP10k") for cb in cbars)
    # the correlation over spots in the predicted panel's title
    r = np.corrcoef(observed, predicted)[0, 1]
    assert axs[1].get_title() == f"ERBB2 — predicted\nPearson r = {r:.2f} over 20 spots"
    # each panel its own scale on request; given limits win over both
    axs = bt.pl.expression(sdata, "ERBB2", share_scale=False)
    np.testing.assert_allclose(_spot_collection(axs[0]).get_clim(), (observed.min(), observed.max()))
    np.testing.assert_allclose(_spot_collection(axs[1]).get_clim(), (predicted.min(), predicted.max()))
    axs = bt.pl.expression(sdata, "ERBB2", vmin=0.0)
    for ax in axs:
        np.testing.assert_allclose(_spot_collection(ax).get_clim(), (0.0, max(observed.max(), predicted.max())))


def test_expression_title_when_correlation_is_undefined(sdata):
    table = sdata.tables[Key.SPOTS_TABLE]
    table.obsm[Key.PREDICTED]["KRT19"] = 1.0  # a constant prediction
    axs = bt.pl.expression(sdata, "KRT19")
    assert axs[1].get_title() == "KRT19 — predicted\nPearson r undefined over 20 spots"


@pytest.mark.parametrize(
    ("plot", "writekey"),
    [
        (lambda d, **kw: bt.pl.expression(d, "EPCAM", **kw), "expression_EPCAM"),
        (lambda d, **kw: bt.pl.phenotypes(d, **kw), "phenotypes_s1"),
        (lambda d, **kw: bt.pl.metrics(pd.Series([0.1, 0.3], index=["A", "B"]), **kw), "metrics"),
        (lambda d, **kw: bt.pl.training({"train": [1.0, 0.5]}, **kw), "training"),
    ],
)
def test_show_save_return_fig_follow_scanpy(sdata, tmp_path, monkeypatch, plot, writekey):
    import scanpy as sc

    before = sc.settings.figdir, sc.settings.file_format_figs, sc.settings.plot_suffix
    sc.settings.figdir, sc.settings.file_format_figs, sc.settings.plot_suffix = tmp_path / "figures", "png", ""
    try:
        _show_save_return_fig(sdata, tmp_path, monkeypatch, plot, writekey)
    finally:
        sc.settings.figdir, sc.settings.file_format_figs, sc.settings.plot_suffix = before


def _show_save_return_fig(sdata, tmp_path, monkeypatch, plot, writekey):
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    out = plot(sdata)  # default: the axes, as before
    assert isinstance(out, Axes) or all(isinstance(a, Axes) for a in out)
    fig = plot(sdata, return_fig=True)
    assert isinstance(fig, Figure) and fig.axes
    monkeypatch.setattr(plt, "show", lambda *a, **k: None)
    assert plot(sdata, show=True) is None
    plot(sdata, save=True)  # scanpy's rule: {figdir}/{writekey}{plot_suffix}.{file_format_figs}
    assert (tmp_path / "figures" / f"{writekey}.png").stat().st_size > 0
    plot(sdata, save="_C3.pdf")  # a string is appended to the name, its ending gives the file type
    assert (tmp_path / "figures" / f"{writekey}_C3.pdf").read_bytes().startswith(b"%PDF")
    target = tmp_path / "here" / "plot.svg"  # a Path is the file itself
    assert isinstance(plot(sdata, save=target, return_fig=True), Figure)
    assert target.is_file()
    plt.close("all")
    for bad, error in [({"show": "yes"}, TypeError), ({"save": 3}, TypeError), ({"return_fig": 1}, TypeError)]:
        with pytest.raises(error, match=f"`{next(iter(bad))}` must be"):
            plot(sdata, **bad)
    with pytest.raises(ValueError, match="empty string"):
        plot(sdata, save="")
    assert not plt.get_fignums()  # nothing drawn before the checks failed


def test_expression_checks_scale_arguments(sdata):
    with pytest.raises(TypeError, match="share_scale"):
        bt.pl.expression(sdata, "EPCAM", share_scale="no")
    with pytest.raises(ValueError, match="must be below"):
        bt.pl.expression(sdata, "EPCAM", vmin=2.0, vmax=1.0)
    assert not plt.get_fignums()


def test_scale_bar_from_the_tables_pixel_size(sdata):
    # a table alone (no image) draws a scale bar when it records its pixel size, as bitro's cell tables do
    cells = sdata.tables[Key.CELLS_TABLE]
    ax = bt.pl.phenotypes(cells)
    assert not [a for a in ax.artists if a.__class__.__name__ == "AnchoredSizeBar"]
    cells.uns[Key.UNS] = {Key.PIXEL_SIZE: {"s1": PX}}
    ax = bt.pl.phenotypes(cells)
    (bar,) = [a for a in ax.artists if a.__class__.__name__ == "AnchoredSizeBar"]
    assert bar.txt_label.get_text().endswith("µm")


def test_scale_bar_from_a_spot_tables_reader_record(sdata):
    table = sdata.tables[Key.SPOTS_TABLE]
    table.uns[Key.UNS]["read_st"] = {"s1": {"pixel_size": PX}}  # as bt.io.read_st records it
    axs = bt.pl.expression(table, "EPCAM")  # the table alone: no image
    for ax in axs:
        assert not ax.images
        assert [a for a in ax.artists if a.__class__.__name__ == "AnchoredSizeBar"]
