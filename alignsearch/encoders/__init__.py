"""Encoders: turning text and pictures into ALIGN's 640-d vectors. Which backend and precision run (backend: pure
rules), the torch towers (model), the exported ONNX/OpenVINO towers and their cache (onnxexport, onnxrun, cached,
coldstart), zero-shot tags (classify) and fine-tuning (finetune, pairs). Imports media and storage, never search.
"""
