"""The result objects of a fixed job are byte-identical to those of the package before its
re-layout (tests/data/golden_results.json was written by the flat pre-layout package).

The job: phantom study seed 3 at 416x320, written as DICOM and read back, the three shipped
bundles on the CPU, fixed result UIDs and creation time; BINARY SEGs with a CAD SR, FRACTIONAL
JPEG 2000 SEGs, and the preview PNGs. Any change in decoding, preprocessing, the networks,
region analysis or the writers changes a digest. The digests hold for the library versions
recorded beside them (highdicom writes its own version into every object; other releases of
torch or numpy may round differently): with other versions the test is skipped, saying so.

Regenerated for issue 14 (part 2), intentionally: the breast mask is a segmentation, not a
threshold (frame, labels, skin markers, pectoral muscle on MLO), the models crop to it and
every map is zeroed outside it (no mark outside the breast); overlapping marks of several
models are one SR finding; the SR and CAD SR state the operating point (Algorithm
Parameters) and the orientation source; the shipped bundles load their default operating
point (fp1, chosen on mini-MIAS folds): the U-Net is dunet 0.2.0 (fine-tuned on mini-MIAS
masses) at threshold 0.6285, and GLAM's and microcalc's maps are switched off (no signal on
MIAS validation folds), so the SEGs carry the U-Net's segment only. Made with the same job
(``job_digests``) and the library versions recorded in the JSON.

The digests include the per-image presentation states (``PR-*``, issue 18, on by default);
adding them changed no other digest.

Regenerated once more (same job, same versions): dunet 0.2.0 marks masses of either severity,
so its map is the finding ``mass`` (its manifest's ``finding``), not ``malignant_lesion``: the
SEG segment, SR finding, GSPS labels and previews say "Mass" instead of "Malignant lesion".

Regenerated for issue 15 (same job, same versions): GLAM 0.2.0 (Genesis-pretrained, trained on
the calibrated phantoms, fine-tuned on mini-MIAS) replaces 0.1.0, and the shipped operating
points were re-chosen on mini-MIAS with both MIAS-tuned models (benchmarks/bench_mias_node.py).

Regenerated for issue 26 (same job, same versions), intentionally: dunet 0.3.0 replaces 0.2.0
(the whole breast crop at 0.8 mm working pixels instead of 128x96, Platt-calibrated region
scores), and the shipped operating points were re-chosen by bench_mias_node.py with the 0.3.0
fold bundles; the default point is now fp0.25 (the loosest point whose validation false marks
per normal MIAS image stay within 0.5), the U-Net's threshold 0.0971 on its calibrated map, and
GLAM is off at every named point (fine-tuned on all of mini-MIAS without fold bundles, so not
validated on held-out images). The SEGs carry the U-Net's segment only, as before; every
digest changed (maps, thresholds, Algorithm Parameters, previews).

Regenerated for issue 26 (same job, same versions), intentionally: breast mask v4 (film labels and
markers on the skin line and film-edge strips excluded, chest-wall component, plausibility checks
with a logged fallback). On this phantom job only two FRACTIONAL SEGs changed (the maps are
zeroed outside a slightly different mask); the binary SEGs, SRs, GSPS and previews are unchanged.

Regenerated for issue 26 once more (same job, same versions, breast mask v4), intentionally: GLAM
0.3.0 (the hybrid curriculum: masses inserted into mini-MIAS normals, conspicuous then realistic,
plus the real images; five-fold held-out image AUC 0.65) replaces 0.2.0-compact+mias. Its maps stay
off at every named point, so the SEGs are unchanged; its image scores (benign / malignant) and
version are in the SR and on the previews, so the two SRs and the four previews changed (6 of 23
digests).

Regenerated right after (same job, same versions), intentionally: the shipped operating points were
re-chosen by bench_mias_node.py with breast mask v4 (the mask changes the MIAS marks): the U-Net's
fp0.25 threshold is 0.0913 instead of 0.0971, so its SEG segments, presentation states, SRs and
previews changed (20 of 23 digests).

Regenerated for issue 26 once more (same job, same versions, breast mask v4), intentionally:
microcalc 0.3.0 (the 0.2.0 networks, trained on clusters inserted into real CBIS-DDSM and FFDM
backgrounds, with a cluster stage: BI-RADS-sized calcifications, a logistic cluster model and a
sharp-image calibration) replaces 0.1.0, and its cluster map is on at the default point fp0.25:
the SEGs, presentation states and SRs changed (19 of 23 digests); the previews did not.

Regenerated for issue 26 once more (same job, same versions, same networks), intentionally: the
default point's thresholds were re-chosen by bench_mias_node with microcalc 0.3.0's fold bundles
(--default-by-parts): the cluster map at 0.8392 instead of 0.7985 (0.125 false clusters per
mini-MIAS image in the node's own marks, not the cluster bench's window scores); the four SEGs and
two SRs of each encoding changed (11 of 23 digests). The microcalc cascade's strips (issue 28m)
give the same values bit for bit and moved nothing.

Regenerated for issues 26 and 28 (same job, same versions), intentionally: microcalc 0.4.0 (the
same recipe and data at a 0.07 mm working pixel, 39 px patches, 0.46x the time per study; cluster
stage refitted by 0.3.0's recipe, default threshold re-chosen by bench_mias_node) replaces 0.3.0:
its cluster map changed the four SEGs and two SRs of each encoding (11 of 23 digests). The
previews drawn after the job is recorded (issue 28) and the writers' cuts moved nothing.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import io
import json
from pathlib import Path

import pydicom
import pytest

from dicom_ai.core.options import ResultOptions
from dicom_ai.core.uids import ResultUIDs
from dicom_ai.data import generate_study, write_study
from dicom_ai.networks import Pipeline
from dicom_ai.node.processing import run_pipeline
from dicom_ai.results import build_results

GOLDEN = Path(__file__).parent / "data" / "golden_results.json"
ROOT = "1.2.826.0.1.3680043.8.498."


def _fixed_uids(sources: list[pydicom.Dataset]) -> ResultUIDs:
    return ResultUIDs(seg_series=ROOT + "100",
                      seg_instances={str(ds.SOPInstanceUID): f"{ROOT}101.{i}" for i, ds in enumerate(sources)},
                      sr_series=ROOT + "102", sr_instance=ROOT + "103", cad_series=ROOT + "104",
                      cad_instance=ROOT + "105", created="20261201120000")


def job_digests(work: Path) -> dict[str, str]:
    """SHA-256 of every object (and preview) the fixed job writes."""
    write_study(generate_study(3, shape=(416, 320)), work / "study")
    sources = [pydicom.dcmread(p) for p in sorted((work / "study").glob("*.dcm"))]
    sources, findings, notes = run_pipeline(Pipeline.from_bundles(["glam", "dunet", "microcalc"], "cpu"), sources)
    assert notes == []
    uids = _fixed_uids(sources)
    digests = {}
    variants = {"binary": ResultOptions(cad_sr=True),
                "fractional-j2k": ResultOptions(segmentation_type="FRACTIONAL", compression="jpeg2000",
                                                seg_series_number=9011)}
    for name, options in variants.items():
        for ds in build_results(sources, findings, uids, options=options).datasets:
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            digests[f"{name}/{ds.Modality}-{ds.SOPInstanceUID}.dcm"] = hashlib.sha256(buf.getvalue()).hexdigest()
    for path in build_results(sources, findings, uids).write_previews(work / "previews"):
        digests[f"previews/{path.name}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


@pytest.mark.slow
def test_fixed_job_is_byte_identical_to_the_pre_layout_package(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    installed = {name: md.version(name) for name in golden["versions"]}
    if installed != golden["versions"]:
        pytest.skip(f"golden digests were made with {golden['versions']}, installed are {installed}")
    assert job_digests(tmp_path) == golden["sha256"]
