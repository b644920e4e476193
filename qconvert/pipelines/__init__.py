"""Pipelines: each one a typed function that chains the layers below into one artifact or one verdict.

    gguf.py     output_name, resolve_preset, seed_plan (``--dry-run`` from published shapes), importance_matrix
                (--imatrix / --stats / --calib -> the K-quants' weights); the export itself is
                ``qconvert.gguf.export.export_gguf``
    int4.py     write_int4: calibrate (or quantize from saved statistics) and write a GPTQ/AWQ checkpoint + card,
                in the method's own layout or compressed-tensors; convert_format: re-pack one layout into another;
                write_w8a8: W8A8 INT8 (RTN or GPTQ int8 weights, optional SmoothQuant) as compressed-tensors
                int-quantized
    verify.py   verify_artifacts: the float reference once, every artifact in its own runtime, gates, baseline

ONNX export is ``qconvert.onnx_export.export_onnx`` and a release ``qconvert.release.run_release``.

Layering: formats and algorithms (gguf/, int4/, quant/, onnx_export/ graph and writers, card.py) at the bottom;
the calibration driver and runtimes above them; pipelines here; ``qconvert.commands`` (argument parsing and
printing) on top. Nothing here imports ``qconvert.commands``, ``qconvert.cli`` or ``qconvert.fixtures``.
"""
