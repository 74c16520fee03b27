"""Backends of the sparse encoder; each module exports ``encode(encoder, images, visible_cells)``."""
