"""Exports: Hugging Face transformers (`hf.py`) and ONNX (`onnx.py`)."""
