"""``export-student``: Turn a trained student into a deployable ONNX / OpenVINO / TensorRT bundle."""

from __future__ import annotations

from lowmag.cli_support import stage_group

main = stage_group(
    "Turn a trained student into a deployable ONNX / OpenVINO / TensorRT bundle.",
    pending="the export-student issue (#4)",
)

if __name__ == "__main__":  # pragma: no cover
    main()
