"""Readers and writers, and the layout of the SpatialData objects bitro works on.

Readers
-------
:func:`read_st` reads a legacy Spatial Transcriptomics section (HER2ST format), :func:`read_wsi`
a pyramidal whole-slide image; :func:`write_zarr` writes any SpatialData atomically.

What bitro expects of a SpatialData
-----------------------------------
bitro's readers write the layout of :mod:`bitro._constants` (``"{s}_image"``, ``"{s}_spots"``,
table ``"spots"``, coordinate systems ``"{s}"`` and ``"{s}_um"``). Objects made by spatialdata-io
(or by hand) work too; per section bitro needs:

- one H&E image: ``(c, y, x)`` uint8 RGB, preferably multiscale, with an Identity transformation to
  the section's pixel coordinate system. spatialdata-io's Visium reader names that coordinate
  system after the dataset (e.g. ``"visium_ds"``, not ``"global"``) and stores the full-resolution
  image as ``"{id}_full_image"`` (only when ``fullres_image_file`` is given); the downscaled
  ``"{id}_hires_image"`` / ``"{id}_lowres_image"`` are recognised as copies and ignored;
- the pixel size, as the micrometre coordinate system ``"{cs}_um"``: spatialdata-io does not
  record it, so call :func:`set_pixel_size` once (e.g. ``spot_diameter_um=55`` with
  ``spots_key="{id}"`` for Visium);
- for spot-level training, spot circles (Points with a ``radius`` column, in pixels) in the same
  coordinate system, and a table annotating them (spatialdata-io: table ``"table"`` with
  ``region="{id}"``, ``region_key="region"``, ``instance_key="spot_id"``).

:func:`get_sections` finds these pieces and returns one :class:`Section` per tissue section.
"""

from bitro.io._image import read_image
from bitro.io._sections import Section, get_sections, set_pixel_size
from bitro.io._st import read_st
from bitro.io._wsi import read_wsi
from bitro.io._zarr import write_zarr

__all__ = ["Section", "get_sections", "read_image", "read_st", "read_wsi", "set_pixel_size", "write_zarr"]
