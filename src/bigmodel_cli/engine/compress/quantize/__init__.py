"""The pieces of ``bigmodel quantize`` (the command itself is ``engine/compress/quantize/command.py``).

- ``scheme``       which int8 scheme suits the CPU it runs on (VNNI, AVX-512, AVX2, ARM)
- ``calibration``  calibration inputs (the artifact's training split or ``--calib-data``)
- ``onnx_int8``    ONNX Runtime's pre-processing, dynamic and static (QDQ) quantization
- ``gate``         per-tensor quantization error, node ranking, the accuracy gate's retries
- ``measure``      the before/after report: size, task metric, latency with the same threads
- ``weight_only``  int8 / packed int4 weights in model.safetensors, dequantized on load
"""
