"""Find the sections of a SpatialData: which image, spots and coordinate system belong together.

bitro's own readers write the layout described in :mod:`bitro._constants`; objects made by
spatialdata-io (Visium, Visium HD, Xenium) or by hand are accepted too, as long as each section
has one H&E image, a pixel coordinate system and a recorded pixel size (see :func:`set_pixel_size`).

What a section needs (see also :mod:`bitro.io`):

- image: ``(c, y, x)`` uint8 RGB, single- or multiscale, with an Identity transformation to the
  section's pixel coordinate system ``cs``. Images named ``"*_image"`` are taken (bitro's
  ``"{s}_image"``, spatialdata-io's ``"{id}_full_image"``), else the largest identity image of each
  coordinate system. An image that maps into ``cs`` by a scaling while a larger image is the identity
  image of ``cs`` is a downscaled copy (spatialdata-io's ``"{id}_hires_image"``, ``"{id}_lowres_image"``)
  and is skipped.
- section id: ``s`` for bitro's ``"{s}_image"`` in coordinate system ``"{s}"``; otherwise the
  coordinate system name (spatialdata-io names it after the dataset, e.g. ``"visium_ds"``), or the
  image name without ``"_image"`` when the coordinate system is the generic ``"global"``.
- pixel size: a transformation to ``"{cs}_um"`` (written by bitro's readers, or by
  :func:`set_pixel_size` for objects from elsewhere).
- spots (optional): ``"{s}_spots"``, else the one circles element (Points + ``radius`` in pixels) in ``cs``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bitro._constants import Key
from bitro._deprecate import renamed_args
from bitro._utils import check_key, scale0

if TYPE_CHECKING:
    from spatialdata import SpatialData


@dataclass(frozen=True)
class Section:
    """One tissue section of a SpatialData.

    Attributes
    ----------
    sample
        Section id, written to ``.obs["sample"]`` of every table bitro makes.
    image_key
        The H&E image element.
    coordinate_system
        Pixel coordinate system of the section (full-resolution pixels of ``image_key``).
    pixel_size
        Micrometres per pixel in ``coordinate_system``.
    spots_key
        Spot shapes (circles) of the section, or ``None`` when it has none.
    cells_key
        Name of the cell shapes element of the section (may not exist yet).
    """

    sample: str
    image_key: str
    coordinate_system: str
    pixel_size: float
    spots_key: str | None
    cells_key: str


def _pixel_coordinate_systems(element) -> list[str]:
    from spatialdata.transformations import get_transformation

    return [cs for cs in get_transformation(element, get_all=True) if not cs.endswith(Key.MICRONS_SUFFIX)]


def _n_pixels(image) -> int:
    level = scale0(image)
    return int(level.sizes["y"] * level.sizes["x"])


def _is_identity(element, coordinate_system: str) -> bool:
    from spatialdata.transformations import get_transformation

    t = get_transformation(element, to_coordinate_system=coordinate_system)
    m = t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    return bool(np.allclose(m, np.eye(3)))


def _is_circles(gdf) -> bool:
    return "radius" in gdf.columns and len(gdf) > 0 and bool((gdf.geometry.geom_type == "Point").all())


def _is_downscaled_copy(sdata: SpatialData, key: str) -> bool:
    """Whether ``key`` is a downscaled copy of another image.

    That is, it maps by a non-identity (scaling) transformation into a coordinate system whose
    identity image is larger.

    spatialdata-io's ``"{id}_hires_image"`` and ``"{id}_lowres_image"`` are such copies of
    ``"{id}_full_image"``: all three are in the coordinate system ``"{id}"``.
    """
    image = sdata.images[key]
    for cs in _pixel_coordinate_systems(image):
        if _is_identity(image, cs):
            continue
        for other, img in sdata.images.items():
            if other != key and _n_pixels(img) > _n_pixels(image) and cs in _pixel_coordinate_systems(img):
                if _is_identity(img, cs):
                    return True
    return False


def _section_images(sdata: SpatialData) -> list[str]:
    """The H&E image of every section.

    The images named ``"*_image"`` (bitro and spatialdata-io name them so), else the largest identity
    image of each pixel coordinate system; downscaled copies are left out.
    """
    keys = [k for k in sdata.images if k.endswith(Key.IMAGE_SUFFIX)]
    if not keys:
        best: dict[str, tuple[int, str]] = {}
        for k, img in sdata.images.items():
            for cs in _pixel_coordinate_systems(img):
                if _is_identity(img, cs) and _n_pixels(img) > best.get(cs, (-1, ""))[0]:
                    best[cs] = (_n_pixels(img), k)
        keys = list(dict.fromkeys(k for _, k in best.values()))
    return [k for k in keys if not _is_downscaled_copy(sdata, k)]


def _sample_name(image_key: str, coordinate_system: str, systems: list[str]) -> str:
    """Section id of an image.

    ``"{s}"`` for bitro's ``"{s}_image"`` in coordinate system ``"{s}"``; else the coordinate system
    (spatialdata-io names it after the dataset), unless that is the generic ``"global"``.
    """
    prefix = image_key.removesuffix(Key.IMAGE_SUFFIX)
    if prefix in systems or coordinate_system == "global":
        return prefix
    return coordinate_system


@renamed_args(sdata="data")
def get_sections(
    data: SpatialData,
    *,
    image_key: str | Mapping[str, str] | None = None,
    spots_key: str | None = None,
    coordinate_system: str | None = None,
    samples: list[str] | None = None,
) -> list[Section]:
    """List the sections of ``data``.

    Parameters
    ----------
    data
        The SpatialData object.
    image_key
        Use only this image (one section), or a mapping ``{sample: image_key}`` naming the image of
        each section (e.g. the stain-normalised copies). By default every image named ``"*_image"``, or if
        there is none the largest identity image of each pixel coordinate system, leaving out
        downscaled copies (spatialdata-io's ``"{id}_hires_image"`` beside ``"{id}_full_image"``).
    spots_key
        Spot circles of the section; by default ``"{sample}_spots"`` or the one circles element
        in the section's coordinate system.
    coordinate_system
        Pixel coordinate system of the section; by default the image's first one.
    samples
        Keep only these section ids.

    Returns
    -------
    One :class:`Section` per section, in the order of the images.
    """
    from spatialdata import SpatialData

    from bitro._utils import pixel_size

    if not isinstance(data, SpatialData):
        msg = (
            f"`data` must be a SpatialData with the H&E images, got {type(data).__name__}; read one with "
            "`bt.io.read_image`, `bt.io.read_wsi`, `bt.io.read_st` or `spatialdata.read_zarr`."
        )
        raise TypeError(msg)
    given_samples: dict[str, str] = {}
    if isinstance(image_key, Mapping):
        for sample, key in image_key.items():
            check_key(data.images, key, "Image")
            given_samples[key] = sample
        image_keys = list(image_key.values())
    elif image_key is not None:
        check_key(data.images, image_key, "Image")
        image_keys = [image_key]
    else:
        image_keys = _section_images(data)
    if not image_keys:
        msg = f"No image found in the SpatialData (images: {list(data.images) or 'none'}). Add an H&E image first."
        raise ValueError(msg)

    sections = []
    for key in image_keys:
        img = data.images[key]
        systems = _pixel_coordinate_systems(img)
        cs = coordinate_system if coordinate_system is not None else systems[0]
        if cs not in systems:
            msg = f"Image {key!r} is not in coordinate system {cs!r}; its coordinate systems are {systems}."
            raise ValueError(msg)
        sample = given_samples.get(key) or _sample_name(key, cs, systems)
        if samples is not None and sample not in samples:
            continue
        sk = spots_key
        if sk is None:
            if Key.spots(sample) in data.shapes:
                sk = Key.spots(sample)
            else:
                candidates = [
                    k
                    for k, gdf in data.shapes.items()
                    if _is_circles(gdf)
                    and cs in _pixel_coordinate_systems(gdf)
                    and not k.endswith((Key.CELLS_SUFFIX, Key.VIRTUAL_SPOTS_SUFFIX))
                ]
                sk = candidates[0] if len(candidates) == 1 else None
        else:
            check_key(data.shapes, sk, "Shapes element")
            if cs not in _pixel_coordinate_systems(data.shapes[sk]):
                msg = f"Spots {sk!r} are not in the coordinate system {cs!r} of image {key!r}."
                raise ValueError(msg)
        sections.append(Section(sample, key, cs, pixel_size(data, key, cs), sk, Key.cells(sample)))
    if samples is not None:
        missing = sorted(set(samples) - {s.sample for s in sections})
        if missing:
            msg = f"Samples {missing} not found; available: {[s.sample for s in get_sections(data)]}."
            raise KeyError(msg)
    return sections


@renamed_args(sdata="data")
def set_pixel_size(
    data: SpatialData,
    image_key: str,
    um_per_px: float | None = None,
    *,
    spot_diameter_um: float | None = None,
    spots_key: str | None = None,
    coordinate_system: str | None = None,
) -> float:
    """Record the pixel size of an image, as a micrometre coordinate system ``"{cs}_um"``.

    Every element in the image's pixel coordinate system ``cs`` gets a transformation to
    ``"{cs}_um"`` (its transformation to ``cs`` followed by a scale by ``um_per_px``).

    Parameters
    ----------
    data
        The SpatialData object (modified in place).
    image_key
        The H&E image.
    um_per_px
        Micrometres per pixel of the image's full resolution level.
    spot_diameter_um
        Instead of ``um_per_px``: the physical spot diameter (55 for Visium, 100 for legacy ST);
        the pixel size is then the diameter divided by the median spot diameter in pixels.
    spots_key
        Spot circles used with ``spot_diameter_um``.
    coordinate_system
        Pixel coordinate system; by default the image's first one.

    Returns
    -------
    The pixel size in micrometres per pixel.
    """
    from spatialdata.transformations import Scale, Sequence, get_transformation, set_transformation

    check_key(data.images, image_key, "Image")
    cs = coordinate_system or _pixel_coordinate_systems(data.images[image_key])[0]
    if (um_per_px is None) == (spot_diameter_um is None):
        msg = "Give exactly one of `um_per_px` or `spot_diameter_um`."
        raise ValueError(msg)
    if um_per_px is None:
        if spots_key is None:
            msg = "`spot_diameter_um` needs `spots_key`, the spot circles whose radius (in pixels) it is compared to."
            raise ValueError(msg)
        check_key(data.shapes, spots_key, "Shapes element")
        um_per_px = float(spot_diameter_um) / (2 * float(np.median(data.shapes[spots_key]["radius"])))
    if not np.isfinite(um_per_px) or um_per_px <= 0:
        msg = f"The pixel size must be a positive number of micrometres per pixel, got {um_per_px!r}."
        raise ValueError(msg)
    from spatialdata.models import get_axes_names

    for _, _, element in data.gen_spatial_elements():
        transforms = get_transformation(element, get_all=True)
        if cs in transforms:
            # images: name the channel axis as zarr stores it, so that a written object reads back identical
            if "c" in get_axes_names(element):
                scale = Scale([1.0, um_per_px, um_per_px], axes=("c", "y", "x"))
            else:
                scale = Scale([um_per_px, um_per_px], axes=("x", "y"))
            set_transformation(element, Sequence([transforms[cs], scale]), to_coordinate_system=Key.microns(cs))
    return float(um_per_px)
