"""Stain normalisation of H&E images (Macenko / Vahadane), built on ``squidpy.experimental.im``.

squidpy 1.8.2 already fits stain matrices on a tissue mask (Macenko's angular extremes, or a sparse
NMF for Vahadane, both numpy / scikit-learn) and applies them lazily, block by block, with dask.
This module picks the reference, makes the tissue masks it needs, and writes the result as a new
image element with the source's transformations, chunks and pyramid.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from bitro._checks import StainFitError
from bitro._constants import Key
from bitro._deprecate import renamed_args
from bitro._logging import logger
from bitro._utils import check_key, scale0

if TYPE_CHECKING:
    from collections.abc import Callable

    from spatialdata import SpatialData
    from squidpy.experimental.im import StainReference

_METHODS = ("macenko", "vahadane")


def _scale_factors(image) -> list[int] | None:
    """Scale factors between consecutive pyramid levels of a multiscale image (None if single-scale)."""
    import xarray as xr

    if not isinstance(image, xr.DataTree):
        return None
    widths = [next(iter(image[k].values())).sizes["x"] for k in image]
    return [round(a / b) for a, b in zip(widths, widths[1:], strict=False)] or None


def _ensure_tissue_mask(sdata: SpatialData, image_key: str) -> str:
    """The tissue mask of an image, detected with squidpy (Otsu on the coarsest level) when missing."""
    key = Key.tissue(image_key)
    if key not in sdata.labels:
        logger.info("Detecting the tissue of %r -> labels[%r].", image_key, key)
        sdata.labels[key] = tissue_labels(sdata.images[image_key])
    return key


def tissue_labels(image):
    """Squidpy's tissue labels of an image element, with the full-resolution level kept lazy.

    :func:`squidpy.experimental.im.detect_tissue` finds the tissue on the coarsest pyramid level and
    then materialises its nearest-neighbour upscaling to full resolution as one int32 numpy array:
    4 bytes per pixel (370 MB for a 92-Mpx HER2ST section, 4.3 GB for a 1-Gpx slide), held for as
    long as the labels are. Here squidpy runs on the coarsest level alone (the same pixels, so the
    same labels, returned at that size), and the upscaling is squidpy's own dask-image affine
    transform left lazy: the labels are identical, computed chunk by chunk when read.

    Parameters
    ----------
    image
        A (multiscale) ``(c, y, x)`` RGB image element.

    Returns
    -------
    A labels element (``(y, x)`` int32, 0 = background, 1.. = tissue pieces) of the image's
    full-resolution size, with its transformations and pyramid scale factors.
    """
    import dask.array as da
    import xarray as xr
    from dask_image.ndinterp import affine_transform
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, Labels2DModel
    from spatialdata.transformations import get_transformation

    from bitro.pp._squidpy import import_squidpy

    import_squidpy()  # before squidpy's own modules: without its import-time SyntaxWarnings
    from squidpy._utils import _get_scale_factors
    from squidpy.experimental.im import detect_tissue
    from squidpy.experimental.im._detect_tissue import _get_scaling_matrix

    full = scale0(image)
    coarse = next(iter(image[list(image.keys())[-1]].values())) if isinstance(image, xr.DataTree) else full
    work = SpatialData(
        images={"coarsest": Image2DModel.parse(coarse.data, dims=("c", "y", "x"), c_coords=coarse.coords["c"].values)}
    )
    with warnings.catch_warnings():
        # squidpy calls skimage's remove_small_holes(area_threshold=...), deprecated in scikit-image 0.26: a
        # FutureWarning per image that only squidpy can act on. Exactly that message is hidden, nothing else.
        warnings.filterwarnings("ignore", r"Parameter `area_threshold` is deprecated", FutureWarning)
        low = detect_tissue(work, "coarsest", inplace=False)  # at the coarsest level's size: the identity upscaling
    target = (int(full.sizes["y"]), int(full.sizes["x"]))
    # squidpy's _affine_upscale_nearest, minus its final np.asarray
    labels = affine_transform(
        da.from_array(np.asarray(low, dtype=np.int32), chunks="auto"),
        matrix=_get_scaling_matrix(low.shape, target),
        offset=(0.0, 0.0),
        output_shape=target,
        order=0,
        mode="constant",
        cval=0,
        output=np.int32,
    )
    return Labels2DModel.parse(
        data=labels,
        dims=("y", "x"),
        transformations=get_transformation(image, get_all=True),
        scale_factors=_get_scale_factors(image),
    )


#: Finest pyramid level (in pixels) a stain fit falls back to when the coarser levels give no stain vectors.
MAX_FIT_PIXELS = 2**22


def _fit_with_fallback(work: SpatialData, image_key: str, fit: Callable[[SpatialData], Any]) -> Any:
    """``fit(work)``, retried on ``image_key``'s pyramid cut one level finer each time its stain vectors fail.

    squidpy fits stain vectors on an image's coarsest level; when they fail there, the fit is repeated with the
    pyramid cut to end one level finer, down to levels of :data:`MAX_FIT_PIXELS`. At a whole slide's coarsest
    level a nucleus is a fraction of a pixel, haematoxylin and eosin colours mix, and Macenko's stain angles can
    fall outside the plausible range; a level or two finer they can separate again (a 268-Mpx slide fitted at its
    2048-px level, not at 1024 px). Images that fit at their coarsest level are unchanged. Finer levels are not
    tried: squidpy holds a level's optical densities in float64 (a 16.7-Mpx level took 2.8 GB).
    """
    import xarray as xr
    from spatialdata import SpatialData

    image = work.images[image_key]
    levels = list(image.keys()) if isinstance(image, xr.DataTree) else []
    try:
        return fit(work)
    except Exception as e:  # noqa: BLE001 - squidpy's StainFittingError; anything else is re-raised below
        if type(e).__name__ != "StainFittingError":
            raise
        error = e
    for n in range(len(levels) - 1, 0, -1):
        coarsest = next(iter(image[levels[n - 1]].values()))
        if coarsest.sizes["y"] * coarsest.sizes["x"] > MAX_FIT_PIXELS:
            break
        cut = xr.DataTree.from_dict({name: image[name].ds for name in levels[:n]})
        try:
            out = fit(SpatialData(images={**work.images, image_key: cut}, labels=dict(work.labels)))
        except Exception as e:  # noqa: BLE001
            if type(e).__name__ != "StainFittingError":
                raise
            continue
        logger.info(
            "Stain vectors of %r fitted on pyramid level %s (%d x %d px): the coarser levels gave none (%s).",
            image_key,
            levels[n - 1],
            coarsest.sizes["x"],
            coarsest.sizes["y"],
            error,
        )
        return out
    _stain_fit_failed(image_key, error)
    return None


def _stain_fit_failed(image_key: str, error: Exception) -> None:
    """Re-raise squidpy's failure to fit stain vectors as one sentence about the image; other errors as they are."""
    if type(error).__name__ != "StainFittingError":
        raise error
    msg = (
        f"No haematoxylin and eosin stain vectors could be fitted on image {image_key!r} ({error}): it holds no or too "
        "little stained tissue. Check that it is an H&E image with tissue, or leave it out (`image_key=`)."
    )
    raise StainFitError(msg) from error


@renamed_args(sdata="data")
def normalize_stain(
    data: SpatialData,
    *,
    method: Literal["macenko", "vahadane"] = "macenko",
    reference: str | StainReference | None = None,
    image_key: str | None = None,
    key_added: str | None = None,
    preserve_background: bool = True,
) -> None:
    """Normalise the H&E stains of every section's image to one reference.

    Stain vectors are fitted on the tissue of the reference image (its coarsest pyramid level) and
    of each image to normalise; each image is then deconvolved with its own stain matrix and
    reconvolved with the reference's, lazily, chunk by chunk (the work is done when pixels are
    read). The fitting and the lazy transform are :mod:`squidpy.experimental.im`'s
    (:func:`~squidpy.experimental.im.fit_stain_reference`,
    :func:`~squidpy.experimental.im.normalize_stains`).

    The result stays lazy: every read recomputes it, and overlapping tile reads recompute shared
    chunks (segmenting HER2ST C2 from it took ~3x the CPU time of segmenting the raw image). On
    large sections, write the SpatialData (or the new element) to zarr and read it back first.

    Parameters
    ----------
    data
        The SpatialData object; normalised images (and missing tissue masks) are added to it.
    method
        ``"macenko"`` (SVD, angular extremes of optical density) or ``"vahadane"`` (sparse NMF).
    reference
        Stain reference: an image element of ``data`` (its stain vectors are fitted), a fitted
        :class:`squidpy.experimental.im.StainReference`, or ``None`` for the first image to be
        normalised (all sections then share its stain colours). To fit on a region, add the crop as
        an image element first (e.g. with :func:`spatialdata.bounding_box_query`).
    image_key
        Normalise only this image; by default the image of every section (:func:`bitro.io.get_sections`).
    key_added
        Name of the new image; by default ``"{image_key}_normalized"``. Only with a single image.
    preserve_background
        Keep non-tissue pixels unchanged (the transform recolours tissue only).

    Returns
    -------
    Nothing; adds to ``data``:

    - ``images["{image_key}_normalized"]`` (or ``key_added``): uint8 RGB, lazy, with the source's
      transformations, chunks and pyramid scale factors;
    - ``labels["{image_key}_tissue"]`` for every image without one (squidpy's ``detect_tissue``);
    - ``attrs["bitro"]["normalize_stain"][key_added]`` (one record per written image): the source ``image_key``,
      method, reference and stain matrices.

    Examples
    --------
    >>> import bitro as bt
    >>> sdata = bt.datasets.her2st()  # doctest: +SKIP
    >>> bt.pp.normalize_stain(sdata, method="macenko")  # doctest: +SKIP
    >>> bt.pp.segment_nuclei(sdata, image_key="C2_image_normalized")  # doctest: +SKIP
    """
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    from bitro.io import get_sections
    from bitro.pp._squidpy import import_squidpy

    sqi = import_squidpy().experimental.im

    if method not in _METHODS:
        msg = f"Unknown stain normalisation `method={method!r}`; choose one of {list(_METHODS)}."
        raise ValueError(msg)
    if image_key is not None:
        check_key(data.images, image_key, "Image")
        image_keys = [image_key]
    else:
        image_keys = [s.image_key for s in get_sections(data)]
    if key_added is not None and len(image_keys) > 1:
        msg = f"`key_added={key_added!r}` names one image but {len(image_keys)} would be normalised; pass `image_key=`."
        raise ValueError(msg)
    if reference is None:
        reference = image_keys[0]
    if isinstance(reference, str):
        check_key(data.images, reference, "Reference image")
    elif not isinstance(reference, sqi.StainReference):
        msg = f"`reference` must be an image key, a squidpy StainReference or None, got {type(reference).__name__}."
        raise TypeError(msg)
    elif reference.method != method:
        msg = f"The given StainReference was fitted with {reference.method!r}, not `method={method!r}`."
        raise ValueError(msg)

    # work on a shallow SpatialData of the images and masks involved: nothing is added to `data`
    # unless every fit succeeds
    reference_key = reference if isinstance(reference, str) else None
    keys = list(dict.fromkeys(image_keys + ([reference_key] if reference_key else [])))
    masks = {Key.tissue(k): data.labels[Key.tissue(k)] for k in keys if Key.tissue(k) in data.labels}
    work = SpatialData(images={k: data.images[k] for k in keys}, labels=masks)
    if reference_key is not None:
        mask_key = _ensure_tissue_mask(work, reference_key)
        reference = _fit_with_fallback(
            work,
            reference_key,
            lambda w: sqi.fit_stain_reference(w, reference_key, method=method, tissue_mask_key=mask_key),
        )
    normalized: dict[str, Any] = {}
    for key in image_keys:
        mask_key = _ensure_tissue_mask(work, key)
        normalized[key] = _fit_with_fallback(
            work,
            key,
            lambda w, key=key, mask_key=mask_key: sqi.normalize_stains(
                w, key, reference, inplace=False, tissue_mask_key=mask_key, preserve_background=preserve_background
            ),
        )
    for label_key in set(work.labels) - set(masks):
        data.labels[label_key] = work.labels[label_key]
    for key, array in normalized.items():
        source = data.images[key]
        target = key_added or Key.normalized(key)
        data.images[target] = Image2DModel.parse(
            array.data,
            dims=array.dims,
            c_coords=["r", "g", "b"],
            transformations=dict(get_transformation(source, get_all=True)),
            scale_factors=_scale_factors(source),
            chunks=scale0(source).data.chunksize,
        )
        data.attrs.setdefault(Key.UNS, {}).setdefault(Key.NORMALIZE_STAIN, {})[target] = {
            "method": method,
            "image_key": key,
            "reference": reference_key,
            "reference_stain_matrix": np.asarray(reference.stain_matrix).tolist(),
            "preserve_background": preserve_background,
        }
        logger.info("Normalised the stains of %r (%s) -> images[%r].", key, method, target)
