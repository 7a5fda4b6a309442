"""dicom_ai: a DICOM node that runs mammography segmentation models and returns SEG and SR.

The package is laid out as a study flows through the node; each part is a subpackage whose
docstring says what it owns and what it may import::

    core        findings interface, views, result UIDs/options, errors  (numpy, pydicom only)
    imaging     decode, photometric/VOI, orientation, breast mask, geometry
    networks    bundles, the three seed methods, the pipeline           (torch)
    results     regions, codes, SEG, TID 1500 SR, Mammography CAD SR, previews (highdicom)
    node        config, storage, job store, SCP, worker, delivery, supervisor, logs
    data        phantoms, phantom folder format, data set adapters, metrics, evaluation
    training    how each method is trained (library functions)
    cli         the ``dicom-ai`` command and ``make demo``

The import rule: a part imports only from the parts listed above it (``core`` from nothing
of the package, ``cli`` from everything), never from a part below it, and there is no import
loop between modules. ``tests/test_layout.py`` walks every import and checks it. The
receiving process (``dicom_ai.node`` without its worker) imports neither torch nor highdicom.
"""

__version__ = "0.1.0"
