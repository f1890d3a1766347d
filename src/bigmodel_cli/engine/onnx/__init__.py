"""Everything about ONNX: files on disk (``files``), ONNX Runtime sessions (``runtime``), a module →
an ONNX file (``exporters``) and the export command (``export``). Imports here are absolute, so the
name of this package never shadows the ``onnx`` library."""
