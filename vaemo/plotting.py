"""Matplotlib for the reports' charts: headless, with a font for every script a label is written in."""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Iterable

from vaemo import progress

# Matplotlib's own font, shipped with it: every chart starts from it, so charts look the same everywhere.
BASE_FONT = "DejaVu Sans"


def pyplot():
    """matplotlib.pyplot on the Agg backend: a cluster node or CI runner has no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def drawing(labels: Iterable[str]):
    """pyplot, under fonts that draw the labels (`fonts_for`). Matplotlib's own warning per missing glyph
    and draw is silenced: `fonts_for` has named those characters once."""
    plt = pyplot()
    with plt.rc_context(fonts_for(labels)), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        yield plt


def fonts_for(labels: Iterable[str]) -> dict:
    """rc settings under which the labels draw: the base font, then installed fonts that have the characters
    it lacks (a user's task names in Chinese, say), most characters first. Characters no installed font has
    are named in one log line: they show as boxes, and the run goes on."""
    from matplotlib import font_manager

    families = [BASE_FONT]
    missing = {c for label in labels for c in label if not c.isspace()} - _characters(font_manager.findfont(BASE_FONT))
    candidates = {
        font.name: font.fname
        for font in font_manager.fontManager.ttflist
        # A last-resort font "has" every character, each drawn as a placeholder box.
        if not font.name.startswith("Last Resort")
    }
    while missing:
        covers = {name: missing & _characters(path) for name, path in sorted(candidates.items())}
        best = max(covers, key=lambda name: len(covers[name]), default=None)
        if best is None or not covers[best]:
            break
        families.append(best)
        missing -= covers.pop(best)
        del candidates[best]
    if missing:
        shown = "".join(sorted(missing)[:20])
        progress.log(
            f"chart: no installed font has {len(missing)} character(s) of its labels ({shown}); they show as boxes"
            " (install a font for them, e.g. fonts-noto-cjk for Chinese, Japanese or Korean)"
        )
    return {"font.family": families}


@functools.lru_cache(maxsize=None)
def _characters(font_path: str) -> frozenset[str]:
    from matplotlib.ft2font import FT2Font

    try:
        return frozenset(chr(code) for code in FT2Font(font_path).get_charmap())
    except (OSError, RuntimeError, ValueError):  # a font file matplotlib listed but cannot read
        return frozenset()
