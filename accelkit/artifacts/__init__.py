"""Artifacts on disk that CI ships: the plan file, export manifests and the output directory.

Bottom layer (imports nothing of accelkit but ``errors`` and ``_io``): typed, versioned records with
the sha256 of every file they reference, checked on load (:mod:`.files`, :mod:`.plan_file`), and
the ownership record and lock of an output directory (:mod:`.outdir`).
"""
