"""The student as a deliverable: its measured footprint, export and int8 quantization."""
