"""lowmag.calibration: calibration sets, INT8 quantization and confidence calibration."""
