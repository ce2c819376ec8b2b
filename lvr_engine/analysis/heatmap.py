"""Selection heat maps: which image patches each latent step fed back (IVT-LR's latent vision).

Geometry (Qwen2-VL, docs/semantics.md): the processor resizes an image to ``(w * 14, h * 14)`` pixels for
``image_grid_thw = (1, h, w)`` (in 14-px patches); the image tokens are the ``merge x merge`` merged
patches in raster order, so token ``i`` covers the box ``(col * 28, row * 28, col * 28 + 28, row * 28 + 28)``
with ``row = i // (w / merge)``, ``col = i % (w / merge)`` (for ``patch_size=14, merge_size=2``).

- :func:`selection_overlay`: the resized image with the chosen tokens outlined (exactly the resized size);
- :func:`draw_selection_heatmap`: a figure with a combined panel and one panel per step, title and legend;
- :func:`selection_frequency_map` / :func:`draw_frequency_heatmap`: how often each token was chosen over
  many questions.

``selected`` indexes a row's image tokens across all its images in prompt order; for a row with several
images pass ``token_offset`` = the number of image tokens before this image (tokens of other images are
skipped).
"""
from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "STEP_COLORS",
    "step_colors",
    "token_grid",
    "token_box",
    "resized_size",
    "selection_overlay",
    "draw_selection_heatmap",
    "selection_frequency_map",
    "draw_frequency_heatmap",
]

# Distinct, saturated colours for steps 1..10 (tab10 without grey); more steps get evenly spaced hues.
STEP_COLORS: tuple[tuple[int, int, int], ...] = (
    (214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189),
    (23, 190, 207), (227, 119, 194), (188, 189, 34), (140, 86, 75), (0, 0, 0),
)

_MARGIN = 8       # px around everything
_GAP = 8          # px between panels
_LABEL_H = 14     # px of the caption row above each panel
_TITLE_H = 18     # px of the title row (only when a title is given)
_LEGEND_H = 18    # px of the legend row


def step_colors(n: int) -> list[tuple[int, int, int]]:
    """``n`` pairwise distinct RGB colours, one per latent step."""
    if n <= len(STEP_COLORS):
        return list(STEP_COLORS[:n])
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb(i / n, 0.9, 0.55 + 0.4 * (i % 2))
        out.append((round(r * 255), round(g * 255), round(b * 255)))
    return out


def _thw(image_grid_thw) -> tuple[int, int, int]:
    t = torch.as_tensor(image_grid_thw).flatten().tolist()
    if len(t) != 3:
        raise ValueError(f"image_grid_thw must be 3 numbers (t, h, w), got {t}")
    t, h, w = (int(x) for x in t)
    if t != 1:
        raise ValueError(f"only still images (t == 1) are supported, got image_grid_thw t={t}")
    return t, h, w


def token_grid(grid, merge_size: int = 2) -> tuple[int, int]:
    """``(rows, cols)`` of image tokens. ``grid``: ``image_grid_thw`` (3 numbers, in patches) or
    ``(rows, cols)`` of tokens already."""
    g = torch.as_tensor(grid).flatten().tolist()
    if len(g) == 2:
        return int(g[0]), int(g[1])
    _, h, w = _thw(g)
    if h % merge_size or w % merge_size:
        raise ValueError(f"grid {h}x{w} patches is not divisible by merge_size {merge_size}")
    return h // merge_size, w // merge_size


def resized_size(image_grid_thw, patch_size: int = 14) -> tuple[int, int]:
    """``(width, height)`` of the image as the processor resized it."""
    _, h, w = _thw(image_grid_thw)
    return w * patch_size, h * patch_size


def token_box(i: int, cols: int, side: int = 28) -> tuple[int, int, int, int]:
    """Pixel box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) of image token ``i`` in a grid ``cols`` wide."""
    r, c = divmod(int(i), cols)
    return c * side, r * side, (c + 1) * side, (r + 1) * side


def _as_steps(selected) -> torch.Tensor:
    sel = torch.as_tensor(selected).long().cpu()
    if sel.ndim == 1:
        sel = sel[None]
    if sel.ndim != 2:
        raise ValueError("selected must be (N, K) (one row of GenerationOutput.selected), "
                         f"got shape {tuple(sel.shape)}")
    return sel


def _prepare_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    img = image.convert("RGB")
    if img.size != size:
        img = img.resize(size, Image.BICUBIC)  # the Qwen2-VL processor's resample
    return img


def selection_overlay(image: Image.Image, selected, image_grid_thw, merge_size: int = 2, *,
                      steps: Sequence[int] | None = None, patch_size: int = 14, line_width: int = 2,
                      fill_alpha: float = 0.25, colors: Sequence[tuple[int, int, int]] | None = None,
                      token_offset: int = 0) -> Image.Image:
    """The processor-resized image (``w * 14`` x ``h * 14``) with the tokens chosen at ``steps`` (0-based;
    default all) outlined in their step's colour: a ``line_width``-px ring just inside each token's box,
    the interior blended with the colour at ``fill_alpha`` (0 = untouched).

    ``selected`` (N, K): one row of ``GenerationOutput.selected``. ``colors`` default :func:`step_colors`.
    """
    sel = _as_steps(selected)
    N = sel.shape[0]
    rows, cols = token_grid(image_grid_thw, merge_size)
    side = patch_size * merge_size
    size = resized_size(image_grid_thw, patch_size)
    colors = list(colors) if colors is not None else step_colors(N)
    if len(colors) < N:
        raise ValueError(f"{len(colors)} colours for {N} steps")
    if not 0.0 <= fill_alpha <= 1.0:
        raise ValueError(f"fill_alpha must be in [0, 1], got {fill_alpha}")
    base = _prepare_image(image, size)
    steps = range(N) if steps is None else list(steps)
    n_tok = rows * cols
    boxes = []  # (step, box)
    for t in steps:
        for i in sel[t].tolist():
            j = i - token_offset
            if 0 <= j < n_tok:
                boxes.append((t, token_box(j, cols, side)))
    if fill_alpha > 0:
        layer = Image.new("RGBA", size, (0, 0, 0, 0))
        d = ImageDraw.Draw(layer)
        a = round(255 * fill_alpha)
        for t, (x0, y0, x1, y1) in boxes:
            d.rectangle((x0, y0, x1 - 1, y1 - 1), fill=(*colors[t], a))
        base = Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")
    d = ImageDraw.Draw(base)
    for t, (x0, y0, x1, y1) in boxes:
        d.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colors[t], width=line_width)
    return base


def _font():
    try:
        return ImageFont.load_default()
    except Exception:  # pragma: no cover - PIL always has a default font
        return None


def _legend(draw: ImageDraw.ImageDraw, x: int, y: int, labels: list[str], colors: list, max_x: int) -> None:
    font = _font()
    for lab, col in zip(labels, colors, strict=True):
        w = int(draw.textlength(lab, font=font)) if hasattr(draw, "textlength") else 6 * len(lab)
        if x + 14 + w > max_x:
            break
        draw.rectangle((x, y + 2, x + 10, y + 12), fill=col, outline=(0, 0, 0))
        draw.text((x + 14, y + 1), lab, fill=(0, 0, 0), font=font)
        x += 14 + w + 12


def draw_selection_heatmap(image: Image.Image, selected, image_grid_thw, merge_size: int = 2, out_path=None,
                           title: str | None = None, *, per_step: bool = True, patch_size: int = 14,
                           line_width: int = 2, fill_alpha: float = 0.25, token_offset: int = 0,
                           colors: Sequence[tuple[int, int, int]] | None = None) -> Image.Image:
    """Figure of the patches each latent step chose, on the real (processor-resized) image.

    Panels left to right: "all steps" (every step's tokens, one colour per step), then "step 1" .. "step N"
    (when ``per_step``); a caption above each panel, the optional ``title`` on top and a legend
    "step 1..N" below. Each panel is exactly :func:`selection_overlay` (``w * 14`` x ``h * 14`` pixels);
    the returned image's ``info["panels"]`` maps each panel's caption to its ``(x0, y0, x1, y1)`` box in
    the figure. Saved as PNG to ``out_path`` if given.
    """
    sel = _as_steps(selected)
    N = sel.shape[0]
    colors = list(colors) if colors is not None else step_colors(N)
    kw = dict(patch_size=patch_size, line_width=line_width, fill_alpha=fill_alpha, colors=colors,
              token_offset=token_offset)
    panels = [("all steps", selection_overlay(image, sel, image_grid_thw, merge_size, **kw))]
    if per_step and N > 1:
        panels += [(f"step {t + 1}", selection_overlay(image, sel, image_grid_thw, merge_size, steps=[t], **kw))
                   for t in range(N)]
    W, H = resized_size(image_grid_thw, patch_size)
    top = _MARGIN + (_TITLE_H if title else 0)
    fig_w = 2 * _MARGIN + len(panels) * W + (len(panels) - 1) * _GAP
    fig_w = max(fig_w, 2 * _MARGIN + 70 * N)  # room for the legend
    fig_h = top + _LABEL_H + H + 4 + _LEGEND_H + _MARGIN
    fig = Image.new("RGB", (fig_w, fig_h), (255, 255, 255))
    d = ImageDraw.Draw(fig)
    font = _font()
    if title:
        d.text((_MARGIN, _MARGIN), title, fill=(0, 0, 0), font=font)
    boxes = {}
    for p, (cap, im) in enumerate(panels):
        x0, y0 = _MARGIN + p * (W + _GAP), top + _LABEL_H
        d.text((x0, top), cap, fill=(0, 0, 0), font=font)
        fig.paste(im, (x0, y0))
        boxes[cap] = (x0, y0, x0 + W, y0 + H)
    _legend(d, _MARGIN, top + _LABEL_H + H + 4, [f"step {t + 1}" for t in range(N)], colors, fig_w - _MARGIN)
    fig.info["panels"] = boxes
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        fig.save(out_path, format="PNG")
    return fig


# --------------------------------------------------------------------------------------------------
# aggregate maps


def selection_frequency_map(selected_list, grid, merge_size: int = 2, *, steps: Sequence[int] | None = None,
                            token_offset: int = 0) -> torch.Tensor:
    """How often each image token was chosen: a (rows, cols) int64 map, rows x cols = ``token_grid(grid)``.

    ``selected_list``: an iterable of (N, K) selections (e.g. every row of ``out.selected`` over a data
    set), or one (Q, N, K) tensor. ``steps`` (0-based) restricts the count to those steps. Indices outside
    this image (``[token_offset, token_offset + rows * cols)``) are skipped; a token counts once per step
    that chose it.
    """
    rows, cols = token_grid(grid, merge_size)
    n = rows * cols
    counts = torch.zeros(n, dtype=torch.long)
    if isinstance(selected_list, torch.Tensor) and selected_list.ndim == 3:
        selected_list = list(selected_list)
    for sel in selected_list:
        s = _as_steps(sel)
        if steps is not None:
            s = s[list(steps)]
        idx = s.flatten() - token_offset
        idx = idx[(idx >= 0) & (idx < n)]
        counts += torch.bincount(idx, minlength=n)
    return counts.view(rows, cols)


def _heat(v: float) -> tuple[int, int, int]:
    """0 -> pale yellow, 1 -> dark red."""
    stops = [(0.0, (255, 255, 204)), (0.35, (254, 178, 76)), (0.7, (240, 59, 32)), (1.0, (128, 0, 38))]
    v = min(max(v, 0.0), 1.0)
    for (a, ca), (b, cb) in zip(stops, stops[1:], strict=False):  # consecutive pairs
        if v <= b:
            f = (v - a) / (b - a)
            return tuple(round(x + f * (y - x)) for x, y in zip(ca, cb, strict=True))
    return stops[-1][1]


def draw_frequency_heatmap(counts, image: Image.Image | None = None, out_path=None, title: str | None = None, *,
                           patch_size: int = 14, merge_size: int = 2, alpha: float = 0.6,
                           normalize: float | None = None, annotate: bool = True) -> Image.Image:
    """Heat map of a :func:`selection_frequency_map` (``counts`` (rows, cols)): each token's box coloured by
    ``count / normalize`` (default the max count; 0 leaves the box untouched), blended at ``alpha`` over
    ``image`` (resized to ``cols * 28`` x ``rows * 28``) or a white canvas; with ``annotate`` the counts
    are written in the boxes. A colour bar ``0 .. max`` goes below. ``info["panels"]["map"]`` is the map's
    box in the figure. Saved as PNG to ``out_path`` if given."""
    c = torch.as_tensor(counts).float().cpu()
    if c.ndim != 2:
        raise ValueError(f"counts must be (rows, cols), got shape {tuple(c.shape)}")
    rows, cols = c.shape
    side = patch_size * merge_size
    size = (cols * side, rows * side)
    base = _prepare_image(image, size) if image is not None else Image.new("RGB", size, (255, 255, 255))
    top_v = float(c.max()) if normalize is None else float(normalize)
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    a = round(255 * alpha)
    for i in range(rows * cols):
        v = float(c.view(-1)[i])
        if v > 0 and top_v > 0:
            x0, y0, x1, y1 = token_box(i, cols, side)
            d.rectangle((x0, y0, x1 - 1, y1 - 1), fill=(*_heat(v / top_v), a))
    overlay = Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")
    font = _font()
    if annotate:
        od = ImageDraw.Draw(overlay)
        for i in range(rows * cols):
            v = int(c.view(-1)[i])
            if v > 0:
                x0, y0, _, _ = token_box(i, cols, side)
                od.text((x0 + 3, y0 + 3), str(v), fill=(0, 0, 0), font=font)
    top = _MARGIN + (_TITLE_H if title else 0)
    bar_h = 10
    fig_w = max(size[0] + 2 * _MARGIN, 160)
    fig_h = top + size[1] + 6 + bar_h + 14 + _MARGIN
    fig = Image.new("RGB", (fig_w, fig_h), (255, 255, 255))
    fd = ImageDraw.Draw(fig)
    if title:
        fd.text((_MARGIN, _MARGIN), title, fill=(0, 0, 0), font=font)
    fig.paste(overlay, (_MARGIN, top))
    y = top + size[1] + 6
    bar_w = fig_w - 2 * _MARGIN
    for x in range(bar_w):
        fd.line((_MARGIN + x, y, _MARGIN + x, y + bar_h), fill=_heat(x / max(bar_w - 1, 1)))
    fd.text((_MARGIN, y + bar_h + 1), "0", fill=(0, 0, 0), font=font)
    hi = f"{top_v:g}"
    fd.text((fig_w - _MARGIN - 6 * len(hi), y + bar_h + 1), hi, fill=(0, 0, 0), font=font)
    fig.info["panels"] = {"map": (_MARGIN, top, _MARGIN + size[0], top + size[1])}
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        fig.save(out_path, format="PNG")
    return fig
