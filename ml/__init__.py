"""ONNX drive-health models for ublkml devices.

Modules: ``features`` (the feature registry and vectorised features),
``model`` (the ONNX plug-in contract, loading, scoring), ``scorer`` (the
thread that scores a live device's completion paths), ``detect`` (fail-slow
detection over telemetry, with baselines), ``telemetry`` and ``smart``
(readers), ``synth`` (labelled synthetic data), ``train`` (optional extra
``train``), ``cli`` (``ublkml model ...``, ``ublkml ml ...``).  See
docs/models.md.
"""
