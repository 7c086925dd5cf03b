"""Human rendering for the CLI: rich tables, terminal block maps, the ``--png`` image.

Nothing here reads the store; it draws the facts ``tierstore.maintenance`` returns.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Sequence

from ...layout import format_size
from ...maintenance.scan import SessionDetail, SessionInfo, ranges

RATIO_SHADES = ((1.05, "·"), (1.25, "░"), (1.5, "▒"), (2.0, "▓"), (math.inf, "█"))
MASS_SHADES = ((0.0, "·"), (0.25, "░"), (0.5, "▒"), (0.75, "▓"), (math.inf, "█"))
MISSING = "?"


def console(stderr: bool = False):
    """A rich console on the current stdout/stderr; wide when not a terminal (no truncation)."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(file=stream, width=None if tty else 200, highlight=False, soft_wrap=not tty)


def size(n: int | None) -> str:
    return "-" if n is None else format_size(n)


def ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def ago(ts: float, now: float | None = None) -> str:
    """Seconds since ``ts`` as '42s ago', '5m ago', '3h ago', '12d ago'."""
    d = max(0.0, (time.time() if now is None else now) - ts)
    for unit, secs in (("d", 86400), ("h", 3600), ("m", 60)):
        if d >= secs:
            return f"{int(d // secs)}{unit} ago"
    return f"{int(d)}s ago"


def stamp(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


# -- tables --------------------------------------------------------------------------------


def ls_table(infos: Sequence[SessionInfo]):
    from rich.table import Table

    t = Table(box=None, header_style="bold", pad_edge=False)
    for col, justify in (("NAME", "left"), ("MODEL", "left"), ("TOKENS", "right"), ("LAYERS", "right"),
                         ("BLOCKS", "right"), ("SIZE", "right"), ("OWN", "right"), ("SHARED", "right"),
                         ("RATIO", "right"), ("CREATED", "right"), ("UPDATED", "right")):
        t.add_column(col, justify=justify, no_wrap=True)
    for i in infos:
        name = i.name if not i.missing_blocks else f"{i.name} (!{i.missing_blocks} missing)"
        t.add_row(name, _short_model(i.model), f"{i.tokens:,}", str(i.layers), f"{i.blocks:,}",
                  size(i.stored_bytes), size(i.own_bytes), size(i.shared_bytes), ratio(i.ratio),
                  ago(i.created), ago(i.updated))
    return t


def _short_model(m: str | None) -> str:
    if not m:
        return "-"
    return os.path.basename(m.rstrip("/")) if os.path.sep in m and len(m) > 40 else m


def kv_table(rows: Sequence[tuple[str, object]]):
    from rich.table import Table

    t = Table(box=None, show_header=False, pad_edge=False)
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")
    for k, v in rows:
        t.add_row(k, "-" if v is None else str(v))
    return t


def layer_table(d: SessionDetail):
    from rich.table import Table

    t = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("LAYER", "BLOCKS", "MISSING", "STORED", "RAW", "RATIO"):
        t.add_column(col, justify="right", no_wrap=True)
    for layer, (s_row, r_row) in enumerate(zip(d.stored, d.raw)):
        stored = sum(s for s in s_row if s is not None)
        raw = sum(r for s, r in zip(s_row, r_row) if s is not None)
        missing = sum(s is None for s in s_row)
        t.add_row(str(layer), str(len(s_row) - missing), str(missing) if missing else "",
                  size(stored), size(raw), ratio(raw / stored if stored else None))
    return t


# -- block maps ----------------------------------------------------------------------------


def _shade(value: float | None, shades) -> str:
    if value is None:
        return MISSING
    return next(ch for limit, ch in shades if value <= limit)


def _columns(n: int, width: int) -> list[range]:
    """Split ``n`` blocks into at most ``width`` consecutive column buckets."""
    cols = max(1, min(n, width))
    return [range(c * n // cols, (c + 1) * n // cols) for c in range(cols)]


def map_width() -> int:
    return max(16, min(160, shutil.get_terminal_size((120, 24)).columns - 8))


def ratio_map(d: SessionDetail, width: int | None = None) -> list[str]:
    """One line per layer; each character is a bucket of blocks shaded by raw/stored."""
    n = d.record.num_blocks
    if n == 0:
        return ["(no blocks)"]
    buckets = _columns(n, width or map_width())
    lines = [_map_header(n, len(buckets))]
    for layer, (s_row, r_row) in enumerate(zip(d.stored, d.raw)):
        chars = []
        for b in buckets:
            if any(s_row[i] is None for i in b):
                chars.append(MISSING)
                continue
            stored = sum(s_row[i] for i in b)
            chars.append(_shade(sum(r_row[i] for i in b) / stored if stored else None, RATIO_SHADES))
        lines.append(f"L{layer:<4}{''.join(chars)}")
    lines.append("ratio raw/stored:  · <=1.05x  ░ <=1.25x  ▒ <=1.5x  ▓ <=2x  █ >2x   ? missing")
    return lines


def mass_map(d: SessionDetail, width: int | None = None) -> list[str]:
    """Accumulated attention mass per block (summed over kv heads), shaded relative to the
    session's largest bucket; ``[]`` when no block has mass recorded."""
    n = d.record.num_blocks
    vals = [m for row in d.mass for m in row if m is not None]
    if n == 0 or not vals or max(vals) <= 0:
        return []
    buckets = _columns(n, width or map_width())
    sums = [[None if any(row[i] is None for i in b) else sum(row[i] for i in b) for b in buckets]
            for row in d.mass]
    top = max((v for row in sums for v in row if v is not None), default=0.0) or 1.0
    lines = [_map_header(n, len(buckets))]
    for layer, row in enumerate(sums):
        lines.append(f"L{layer:<4}" + "".join(_shade(None if v is None else v / top, MASS_SHADES) for v in row))
    lines.append(f"attention mass / max ({top:.3g}):  · 0  ░ <=25%  ▒ <=50%  ▓ <=75%  █ >75%   ? no summary")
    return lines


def _map_header(n: int, cols: int) -> str:
    per = n / cols
    what = "1 block" if per == 1 else f"~{per:.1f} blocks"
    return f"     blocks 0..{n - 1} ({what} per column)"


def shared_lines(d: SessionDetail, names_shown: int = 6) -> list[str]:
    """One line per distinct set of shared blocks (a thousand chats over one system prompt
    share the same blocks: one line, not a thousand)."""
    if not d.shared_with:
        return ["(no blocks shared with other sessions)"]
    groups: dict[tuple[int, ...], list[str]] = {}
    for other, idx in sorted(d.shared_with.items()):
        groups.setdefault(tuple(idx), []).append(other)
    lines = []
    for idx, names in sorted(groups.items(), key=lambda g: (-len(g[0]), g[1][0])):
        shown = ", ".join(names[:names_shown]) + (f" and {len(names) - names_shown} more"
                                                  if len(names) > names_shown else "")
        lines.append(f"{len(idx)} block(s) [{ranges(list(idx))}] with {shown}")
    return lines


def tokens_preview(ids: Sequence[int], head: int = 48, tail: int = 16) -> str:
    ids = [int(i) for i in ids]
    if len(ids) <= head + tail:
        return " ".join(map(str, ids))
    return " ".join(map(str, ids[:head])) + f" ... ({len(ids) - head - tail} more) ... " + \
        " ".join(map(str, ids[-tail:]))


# -- png -----------------------------------------------------------------------------------


def matplotlib_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("matplotlib") is not None and _import_pyplot() is not None
    except Exception:  # noqa: BLE001 - a broken install is "not available"
        return False


def _import_pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_png(d: SessionDetail, path: str) -> None:
    """Two heatmaps (layers x blocks): compression ratio and attention mass."""
    import numpy as np

    plt = _import_pyplot()
    from matplotlib.ticker import MaxNLocator

    ratio_img = np.array([[np.nan if s is None or not s else r / s for s, r in zip(s_row, r_row)]
                          for s_row, r_row in zip(d.stored, d.raw)], dtype=float)
    mass_img = np.array([[np.nan if m is None else m for m in row] for row in d.mass], dtype=float)
    fig, axes = plt.subplots(2, 1, figsize=(10, 2 + 0.25 * max(4, len(d.stored))), squeeze=False)
    for ax, img, title, cmap in ((axes[0][0], ratio_img, "compression ratio (raw / stored)", "viridis"),
                                 (axes[1][0], mass_img, "accumulated attention mass", "magma")):
        im = ax.imshow(img, aspect="auto", interpolation="nearest", cmap=cmap)
        ax.set_title(f"{d.record.name}: {title}")
        ax.set_xlabel("block")
        ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_lines(con, lines: Sequence[str]) -> None:
    for line in lines:
        con.print(line, markup=False, highlight=False, soft_wrap=True)

