"""Readers: legacy ST sections, whole-slide images, and the section layout bitro expects."""

from bitro.io._sections import Section, get_sections, set_pixel_size

__all__ = ["Section", "get_sections", "set_pixel_size"]
