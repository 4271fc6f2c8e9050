"""The profile's charts as plain SVG (no plotting library): histograms with marked values, paired bars."""

from __future__ import annotations

import base64
from typing import Any
from xml.sax.saxutils import escape

_W, _H, _PAD_L, _PAD_B, _TOP = 420, 200, 44, 38, 42
_COLORS = ("#4e79a7", "#f28e2b")


def data_uri(svg: str) -> str:
    """A chart inline, for markdown that cannot reference a file (a Prefect artifact)."""
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()


def _panel(x0: int, title: str, stats: dict[str, Any], marks: list[float]) -> list[str]:
    parts = [f'<text x="{x0 + _W / 2}" y="18" text-anchor="middle" font-weight="bold">{escape(title)}</text>']
    if not stats.get("n"):
        return [*parts, f'<text x="{x0 + _W / 2}" y="{_H / 2}" text-anchor="middle" fill="#777">no data</text>']
    hist, edges = stats["histogram"], stats["edges"]
    top = max(hist) or 1
    plot_w, plot_h = _W - _PAD_L - 10, _H - _TOP - _PAD_B
    low, high = edges[0], edges[-1]
    span = (high - low) or 1.0

    def x(v: float) -> float:
        return x0 + _PAD_L + plot_w * (v - low) / span

    bar_w = plot_w / len(hist)
    for i, n in enumerate(hist):
        h = plot_h * n / top
        parts.append(f'<rect x="{x0 + _PAD_L + i * bar_w:.1f}" y="{_TOP + plot_h - h:.1f}" width="{bar_w - 1:.1f}" '
                     f'height="{h:.1f}" fill="{_COLORS[0]}"><title>{edges[i]:g}–{edges[i + 1]:g}: {n}</title></rect>')
    base = _TOP + plot_h
    parts.append(f'<line x1="{x0 + _PAD_L}" y1="{base}" x2="{x0 + _PAD_L + plot_w}" y2="{base}" stroke="#333"/>')
    parts += [f'<text x="{x(v):.1f}" y="{base + 14}" text-anchor="middle" fill="#555">{v:g}</text>'
              for v in (low, stats["median"], high)]
    parts.append(f'<text x="{x0 + _PAD_L - 6}" y="{_TOP + 8}" text-anchor="end" fill="#555">{top}</text>')
    parts.append(f'<text x="{x0 + _W / 2}" y="{base + 30}" text-anchor="middle" fill="#333">'
                 f'n = {stats["n"]}, median {stats["median"]:g}</text>')
    for m in marks:
        if low <= m <= high:
            parts.append(f'<line x1="{x(m):.1f}" y1="{_TOP - 4}" x2="{x(m):.1f}" y2="{base}" stroke="#e15759" '
                         f'stroke-width="2" stroke-dasharray="4 3"><title>θ = {m:g}</title></line>')
            parts.append(f'<text x="{x(m):.1f}" y="{_TOP - 6}" text-anchor="middle" fill="#e15759">{m:+g}</text>')
    return parts


def histogram_svg(panels: list[tuple[str, dict[str, Any]]], marks: list[float] | None = None) -> str:
    """One histogram per panel, side by side; `marks` are drawn as dashed lines (theta on the gap chart)."""
    width = _W * len(panels)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{_H}" viewBox="0 0 {width} {_H}" '
             'font-family="sans-serif" font-size="11">', f'<rect width="{width}" height="{_H}" fill="white"/>']
    for i, (title, stats) in enumerate(panels):
        parts += _panel(i * _W, title, stats, marks or [])
    return "\n".join([*parts, "</svg>"])


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def bars_svg(title: str, rows: list[tuple[str, int, int]], legend: tuple[str, str]) -> str:
    """Two bars per labelled row (e.g. a use case's seed metadata and its kept pairs)."""
    label_w, plot_w, row_h = 260, 360, 26
    width, height = label_w + plot_w + 60, 50 + row_h * max(len(rows), 1) + 10
    top = max([max(a, b) for _, a, b in rows] or [1]) or 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="18" text-anchor="middle" font-weight="bold">{escape(title)}</text>']
    for i, name in enumerate(legend):
        parts.append(f'<rect x="{label_w + i * 120}" y="28" width="10" height="10" fill="{_COLORS[i]}"/>'
                     f'<text x="{label_w + 14 + i * 120}" y="37">{escape(name)}</text>')
    if not rows:
        parts.append(f'<text x="{width / 2}" y="70" text-anchor="middle" fill="#777">no use cases</text>')
    for r, (label, a, b) in enumerate(rows):
        y = 50 + r * row_h
        parts.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{escape(_short(label, 40))}</text>')
        for i, n in enumerate((a, b)):
            w = plot_w * n / top
            parts.append(f'<rect x="{label_w}" y="{y + 3 + i * 10}" width="{w:.1f}" height="9" fill="{_COLORS[i]}">'
                         f'<title>{escape(legend[i])}: {n}</title></rect>')
            parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + 11 + i * 10}" fill="#333">{n}</text>')
    return "\n".join([*parts, "</svg>"])
