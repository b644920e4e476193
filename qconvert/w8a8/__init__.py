"""W8A8 INT8 passes of the one streaming driver (``qconvert.calibration.driver.stream_layers``).

    passes.py   activation_maxima: one float pass recording max|x| per input channel of every smoothing site;
                Smoothing: SmoothQuant's scales folded into each layer as the driver loads it (``calibrate``'s
                ``transform``; no copy of the checkpoint); w8a8_logits: the forward of a W8A8 checkpoint, dequantized weights and
                per-token int8 fake-quantized linear inputs (what vLLM's int8 kernels compute)

The pure functions (per-token quantization, the smoothing scales, the Qwen2 sites) are
``qconvert.int4.smoothquant``; the int-quantized layout is ``qconvert.int4.formats``; the pipeline that chains
them into a checkpoint is ``qconvert.pipelines.int4.write_w8a8``. This package sits with the driver: formats and
algorithms below it, pipelines above.
"""

from qconvert.w8a8.passes import Smoothing, activation_maxima, w8a8_logits

__all__ = ["Smoothing", "activation_maxima", "w8a8_logits"]
