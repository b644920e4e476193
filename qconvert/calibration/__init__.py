"""Calibration: the one streaming layer-by-layer driver and the passes that run on it.

    driver.py    stream_layers (the layer loop), DeviceLayer, CalibrationSettings, streamed_logits (scoring)
    quantize.py  GPTQ / AWQ / RTN as layer passes: ``calibrate``
    stats.py     the statistics pass (Hessians, mean |x|, Σx² = importance matrix), saved and loaded

The algorithms themselves are pure tensor functions in ``qconvert.int4``; verification (``qconvert.verify``) and
model cards (``qconvert.quality``) score models through ``driver.streamed_logits``.
"""
