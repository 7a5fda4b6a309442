"""dicom_ai.results.regions: spacing rules for areas, components, minimum size, contours inside regions."""

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image

from dicom_ai.results.preview import _nearest_indices
from dicom_ai.results.regions import (RegionError, Spacing, _lattice_polygon_pixels, _matplotlib_polygon_pixels,
                                      area_spacing, find_regions, polygon_pixels, simplify_polygon, trace_contour)

from _results_sources import contour_inside


def _ds(**kw):
    ds = pydicom.Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def test_spacing_rules():
    # Calibrated Pixel Spacing wins.
    s = area_spacing(_ds(PixelSpacing=[0.09, 0.08], ImagerPixelSpacing=[0.1, 0.1], PixelSpacingCalibrationType="GEOMETRY",
                         EstimatedRadiographicMagnificationFactor=1.1))
    assert (s.row_mm, s.column_mm, s.basis) == (0.09, 0.08, "calibrated")
    # Imager Pixel Spacing corrected by ERMF (uncalibrated Pixel Spacing is ignored).
    s = area_spacing(_ds(PixelSpacing=[0.1, 0.1], ImagerPixelSpacing=[0.1, 0.1], EstimatedRadiographicMagnificationFactor=1.25))
    assert s.basis == "ermf" and s.row_mm == pytest.approx(0.08) and s.pixel_area_mm2 == pytest.approx(0.0064)
    # Detector plane when there is no magnification factor.
    assert area_spacing(_ds(ImagerPixelSpacing=[0.07, 0.07])).basis == "detector"
    assert area_spacing(_ds(PixelSpacing=[0.2, 0.2])).basis == "uncalibrated"
    with pytest.raises(RegionError, match="Imager Pixel Spacing"):
        area_spacing(_ds(Rows=10))


def test_trace_contour_of_square_and_single_pixel():
    m = np.zeros((6, 6), bool)
    m[1:4, 2:5] = True
    pts = trace_contour(m)
    assert {tuple(p) for p in pts} == {(1, 2), (1, 3), (1, 4), (2, 4), (3, 4), (3, 3), (3, 2), (2, 2)}
    assert len(pts) == 8
    one = np.zeros((3, 3), bool)
    one[1, 1] = True
    assert trace_contour(one).tolist() == [[1, 1]]


def test_components_area_min_size_and_holes():
    sp = Spacing(0.1, 0.2, "detector")  # 0.02 mm2 per pixel
    p = np.zeros((60, 60), np.float32)
    p[5:25, 5:25] = 0.9          # 400 px = 8 mm2, with a hole
    p[12:16, 12:16] = 0.1        # 16 px hole: filled
    p[40:42, 40:42] = 0.8        # 4 px = 0.08 mm2: dropped at min 0.1 mm2
    p[40:50, 5:10] = 0.6         # 50 px = 1 mm2
    rs = find_regions(p, 0.5, sp, min_area_mm2=0.1)
    assert [r.pixel_count for r in rs.regions] == [400, 50]
    assert rs.regions[0].area_mm2 == pytest.approx(8.0)
    assert rs.regions[1].max_probability == pytest.approx(0.6)
    big = rs.regions[0]
    assert big.mean_probability == pytest.approx((384 * 0.9 + 16 * 0.1) / 400, rel=1e-5)
    assert rs.mask.sum() == 450 and not rs.mask[40, 40]
    for r in rs.regions:
        assert r.contour[0].tolist() == r.contour[-1].tolist()  # closed polyline
        assert contour_inside(r.contour, rs.mask)[0]


def test_nothing_above_threshold():
    rs = find_regions(np.full((10, 10), 0.2, np.float32), 0.5, Spacing(0.1, 0.1, "detector"))
    assert rs.regions == [] and not rs.mask.any()


def test_contours_stay_inside_irregular_regions_and_are_simplified():
    rng = np.random.default_rng(7)
    import SimpleITK as sitk

    sp = Spacing(0.1, 0.1, "detector")
    checked = 0
    for _ in range(8):
        noise = sitk.GetImageFromArray(rng.random((120, 120)).astype(np.float32))
        q = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, 3.0))
        q = (q - q.min()) / (q.max() - q.min())
        rs = find_regions(q, 0.6, sp, max_points=24)
        for r in rs.regions:
            ok, n_inside = contour_inside(r.contour, rs.mask)
            assert ok
            raster = polygon_pixels(np.column_stack([r.contour[:-1, 1] - 0.5, r.contour[:-1, 0] - 0.5]), rs.mask.shape)
            assert not (raster & ~rs.mask).any()
            checked += 1
    assert checked > 10


def test_smooth_disk_contour_is_short_and_tight():
    yy, xx = np.mgrid[:300, :300]
    p = ((yy - 150) ** 2 + (xx - 150) ** 2 <= 100 ** 2).astype(np.float32)
    rs = find_regions(p, 0.5, Spacing(0.1, 0.1, "detector"), max_points=64)
    (r,) = rs.regions
    assert len(r.contour) - 1 <= 64
    ok, n_inside = contour_inside(r.contour, rs.mask)
    assert ok and n_inside > 0.95 * r.pixel_count  # polygon covers the disk up to its rim


def test_one_and_two_pixel_regions_get_an_outline_with_area():
    p = np.zeros((20, 20), np.float32)
    p[5, 5] = p[10, 10] = p[10, 11] = p[15, 3] = p[16, 4] = 0.9
    rs = find_regions(p, 0.5, Spacing(0.1, 0.1, "detector"))
    assert sorted(r.pixel_count for r in rs.regions) == [1, 2, 2]
    for r in rs.regions:
        assert len(np.unique(r.contour, axis=0)) >= 4  # a polygon, not a point or a segment
        ok, enclosed = contour_inside(r.contour, rs.mask)
        assert ok and enclosed == r.pixel_count


def test_regions_of_a_map_do_not_depend_on_where_it_lies_in_a_larger_one():
    """find_regions labels the foreground's bounding box only: the same regions, in the same
    order, with the same contours and values, shifted by the offset, whatever surrounds them."""
    rng = np.random.default_rng(3)
    small = np.zeros((60, 80), np.float32)
    for _ in range(12):
        r, c, h, w = rng.integers(0, 55), rng.integers(0, 75), rng.integers(1, 6), rng.integers(1, 6)
        small[r:r + h, c:c + w] = rng.uniform(0.5, 1.0)
    sp = Spacing(0.1, 0.1, "detector")
    alone = find_regions(small, 0.5, sp)
    big = np.zeros((300, 400), np.float32)
    big[150:210, 230:310] = small
    placed = find_regions(big, 0.5, sp)
    assert len(alone.regions) == len(placed.regions) > 3
    for a, b in zip(alone.regions, placed.regions):
        assert (a.index, a.pixel_count, a.max_probability, a.mean_probability) == \
            (b.index, b.pixel_count, b.max_probability, b.mean_probability)
        assert b.bbox == (a.bbox[0] + 150, a.bbox[1] + 150, a.bbox[2] + 230, a.bbox[3] + 230)
        assert np.array_equal(a.mask, b.mask)
        assert np.allclose(b.contour - a.contour, [230, 150])


def _random_components(rng: np.random.Generator, max_side: int, density: tuple[float, float]) -> np.ndarray:
    """8-connected component labels of a random binary image, 3 to ``max_side - 1`` pixels a side,
    its foreground fraction drawn from ``density``."""
    h, w = (int(v) for v in rng.integers(3, max_side, 2))
    comp = rng.random((h, w)) < rng.uniform(*density)
    return sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(comp.astype(np.uint8)), True))


def test_lattice_polygon_fill_equals_matplotlib():
    """The scanline fill of whole-pixel polygons (traced contours, their simplifications, random
    self-intersecting ones) gives matplotlib's inside-or-on pixels exactly, spike tips included."""
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(400):
        labels = _random_components(rng, 30, (0.3, 0.8))
        h, w = labels.shape
        if labels.max() == 0:
            continue
        raw = trace_contour(labels == 1)
        random_poly = np.column_stack([rng.integers(0, h, 7), rng.integers(0, w, 7)])
        for poly in (raw, simplify_polygon(raw, 1.0), simplify_polygon(raw, 3.0), random_poly):
            if len(poly) < 3:
                continue
            fast = _lattice_polygon_pixels(np.asarray(poly, dtype=np.int64), (h, w))
            assert np.array_equal(fast, _matplotlib_polygon_pixels(np.asarray(poly, dtype=np.float64), (h, w)))
            checked += 1
    assert checked > 800


def test_traced_contour_fill_without_edge_test_is_the_same_union():
    """_contour_for fills a region with the row fill of its traced contour alone (edges=False):
    that contour's edges join 8-neighbours, so the only pixels on an edge are its vertices,
    which are region pixels; the union with the region is the full polygon_pixels one."""
    rng = np.random.default_rng(11)
    checked = 0
    for _ in range(400):
        labels = _random_components(rng, 40, (0.3, 0.9))
        for lab in range(1, min(int(labels.max()), 3) + 1):
            mask = labels == lab
            raw = trace_contour(mask)
            if len(raw) < 3:
                continue
            fast = mask | _lattice_polygon_pixels(raw, mask.shape, edges=False)
            assert np.array_equal(fast, mask | polygon_pixels(raw, mask.shape))
            checked += 1
    assert checked > 300


def test_paint_and_mask_at_equal_the_full_mask():
    """RegionSet.paint (the SEG's frames) and mask_at (the preview's NEAREST downscale, read at
    the indices Pillow picks) give the full-size mask's values without building it."""
    rng = np.random.default_rng(5)
    for _ in range(30):
        h, w = (int(v) for v in rng.integers(20, 400, 2))
        prob = np.zeros((h, w), np.float32)
        for _ in range(int(rng.integers(0, 15))):
            r, c, a, b = rng.integers(0, h), rng.integers(0, w), rng.integers(1, 30), rng.integers(1, 30)
            prob[r:r + a, c:c + b] = rng.uniform(0.5, 1.0)
        regions = find_regions(prob, 0.5, Spacing(0.1, 0.1, "detector"))
        full = regions.mask
        assert np.array_equal(regions.paint(np.zeros((h, w), np.uint8)), full.astype(np.uint8))
        size = (int(rng.integers(1, w + 1)), int(rng.integers(1, h + 1)))
        resized = np.array(Image.fromarray(full.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
        assert np.array_equal(regions.mask_at(_nearest_indices(h, size[1]), _nearest_indices(w, size[0])), resized)
