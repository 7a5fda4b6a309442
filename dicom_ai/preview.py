"""Preview PNG of one mammogram with its AI findings, for IT quality checks (not for diagnosis).

The image is shown as the models saw it (dense tissue bright, ``preprocess.normalise_intensities``),
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

from dicom_ai.codes import display_rgb, finding_codes
from dicom_ai.findings import ImageScore
from dicom_ai.preprocess import normalise_intensities
from dicom_ai.seg_writer import Segment

__all__ = ["render_preview"]


def _outline(mask: np.ndarray) -> np.ndarray:
    m = mask
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def render_preview(source: pydicom.Dataset, segments: Sequence[Segment], scores: Sequence[ImageScore] = (),
                   max_side: int = 1024) -> Image.Image:
    """An RGB PIL image of ``source`` with segment outlines, SR contours and labels."""
    gray = normalise_intensities(source)
    rows, cols = gray.shape
    scale = min(1.0, max_side / max(rows, cols))
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    base = Image.fromarray((gray * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
    rgb = np.array(base.convert("RGB"))
    occurrences: dict[str, int] = {}
    colours = []
    for s in segments:
        n = occurrences.get(s.map.finding, 0)
        occurrences[s.map.finding] = n + 1
        colours.append(display_rgb(s.map.finding, n))
        if s.regions.mask.any():
            small = np.array(Image.fromarray(s.regions.mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
            edge = _outline(small)
            # Thicken by one pixel so the outline survives the PNG viewer's scaling.
            edge[1:, :] |= edge[:-1, :].copy()
            edge[:, 1:] |= edge[:, :-1].copy()
            rgb[edge] = colours[-1]
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for s, colour in zip(segments, colours):
        label = finding_codes(s.map.finding).label
        for region in s.regions.regions:
            pts = [(float(x) * scale, float(y) * scale) for x, y in region.contour]
            if len(pts) > 1:
                draw.line(pts, fill=(255, 255, 255), width=1)
            x0, y0 = min(p[0] for p in pts), min(p[1] for p in pts)
            text = f"{label} ({s.map.model.name}) #{region.index} {100 * region.max_probability:.0f}%"
            draw.text((x0, max(0.0, y0 - 11)), text, fill=colour, font=font)
    lat = str(source.get("ImageLaterality", "?"))
    view = str(source.get("ViewPosition", ""))
    header = f"{lat} {view}  " + "  ".join(f"{s.name} {100 * s.value:.0f}% ({s.model.name})" for s in scores)
    draw.rectangle([0, 0, size[0], 13], fill=(0, 0, 0))
    draw.text((2, 1), header + "  [AI preview, not for diagnosis]", fill=(255, 255, 255), font=font)
    return img
