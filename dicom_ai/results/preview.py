"""Preview PNG of one mammogram with its AI findings, for IT quality checks (not for diagnosis).

The image is shown as the models saw it (dense tissue bright, :func:`dicom_ai.imaging.normalise_intensities`),
downscaled to at most ``max_side`` pixels. Each segment's outline is drawn as a thin band of its
recommended display colour; each region's SR contour (the SCOORD polyline) is drawn as a white
line over it, with a label ``<finding> (<model>) #k <max probability>%``. A header lists the
image and its image-level scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont

from dicom_ai.core.findings import ImageScore
from dicom_ai.core.views import image_name
from dicom_ai.imaging.intensity import normalise_intensities
from dicom_ai.results.codes import display_rgb, finding_codes
from dicom_ai.results.types import Segment

__all__ = ["render_preview"]


def _outline(mask: np.ndarray) -> np.ndarray:
    m = mask
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """The source indices Pillow's NEAREST resize from ``n_in`` to ``n_out`` pixels reads along
    one axis, asked of Pillow itself (it maps each axis on its own), so sampling a mask at them
    gives exactly the resized mask."""
    index = Image.fromarray(np.arange(n_in, dtype=np.int32).reshape(1, -1))  # mode "I"
    return np.asarray(index.resize((n_out, 1), Image.NEAREST)).ravel().astype(np.intp)


def render_preview(source: pydicom.Dataset, segments: Sequence[Segment], scores: Sequence[ImageScore] = (),
                   max_side: int = 1024, max_labels: int = 12) -> Image.Image:
    """An RGB PIL image of ``source`` with segment outlines, SR contours and labels.

    Parameters
    ----------
    source
        The MG image, shown as the models saw it (dense tissue bright).
    segments
        Its analysed segments; regions' contours are SCOORD ``(column, row)`` on the stored grid.
    scores
        Image-level scores listed in the header line.
    max_side
        The longer side of the PNG in pixels (the image is only ever shrunk).
    max_labels
        At most this many region labels, the most probable regions first.
    """
    gray = normalise_intensities(source)
    rows, cols = gray.shape
    scale = min(1.0, max_side / max(rows, cols))
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    base = Image.fromarray((gray * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
    rgb = np.array(base.convert("RGB"))
    rows_read, columns_read = _nearest_indices(rows, size[1]), _nearest_indices(cols, size[0])
    occurrences: dict[str, int] = {}
    colours = []
    for s in segments:
        n = occurrences.get(s.map.finding, 0)
        occurrences[s.map.finding] = n + 1
        colours.append(display_rgb(s.map.finding, n))
        if s.regions.regions:
            # The pixels a NEAREST resize of the full-size mask would read, read from the regions.
            small = s.regions.mask_at(rows_read, columns_read)
            edge = _outline(small)
            # Thicken by one pixel so the outline survives the PNG viewer's scaling.
            edge[1:, :] |= edge[:-1, :].copy()
            edge[:, 1:] |= edge[:, :-1].copy()
            rgb[edge] = colours[-1]
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    line = 15 if max(size) >= 600 else 11
    try:
        font = ImageFont.load_default(size=line - 2)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        font = ImageFont.load_default()
    labelled: list[tuple[float, str, tuple[int, int, int], list[tuple[float, float]]]] = []
    for s, colour in zip(segments, colours):
        label = finding_codes(s.map.finding).label
        for region in s.regions.regions:
            pts = [(float(x) * scale, float(y) * scale) for x, y in region.contour]
            if len(pts) > 1:
                draw.line(pts, fill=(255, 255, 255), width=1)
            text = f"{label} ({s.map.model.name}) #{region.index} {100 * region.max_probability:.0f}%"
            labelled.append((region.max_probability, text, colour, pts))
    # Labels of the most probable regions first, each moved down until it overlaps no other.
    taken: list[tuple[float, float, float, float]] = [(0, 0, size[0], line + 2)]
    for _, text, colour, pts in sorted(labelled, key=lambda t: -t[0])[:max_labels]:
        x0 = min(p[0] for p in pts)
        y = max(float(line + 2), min(p[1] for p in pts) - line)
        w = draw.textlength(text, font=font)
        x0 = max(0.0, min(x0, size[0] - w))
        for _ in range(40):
            box = (x0, y, x0 + w, y + line - 1)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in taken):
                break
            y += line
        taken.append(box)
        draw.text((x0, y), text, fill=colour, font=font)
    header = f"{image_name(source)}  " + "  ".join(f"{s.name} {100 * s.value:.0f}% ({s.model.name})" for s in scores)
    draw.rectangle([0, 0, size[0], line + 1], fill=(0, 0, 0))
    draw.text((2, 1), header + "  [AI preview, not for diagnosis]", fill=(255, 255, 255), font=font)
    return img
