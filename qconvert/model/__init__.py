"""qconvert's own small model forwards (used by the calibration driver and by verification)."""
