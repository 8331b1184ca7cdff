"""Transitional: the old home of the recording modules, split into gradstats.modules,
gradstats.convert and gradstats.nonfinite. Only tests/test_probe.py still reads
``gradstats.nn.gradstats_buffer_names``; delete this file (and its import in __init__) once that
test reads it from gradstats.convert."""

from .convert import gradstats_buffer_names  # noqa: F401
