"""transformers, quieter: no progress bars of its own inside ours, and optionally no load reports."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_transformers(reports: bool = True) -> Iterator[None]:
    """transformers' progress bars ("Writing model shards", weight loading) off for the block.

    reports=False also silences its warnings and load reports: every AR -> A3 load reports the new
    query vector as "MISSING", which is expected.
    """
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    if not reports:
        hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not reports:
            hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
