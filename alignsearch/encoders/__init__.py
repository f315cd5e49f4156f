"""Encoders: turning text and pictures into ALIGN's 640-d vectors. Which backend and precision run (backend: pure
rules), the towers built from that plan with its one fallback (resolve), the torch towers (model, pixels), the
exported ONNX/OpenVINO towers and their cache (onnxexport, onnxrun, records, cached, coldstart), zero-shot tags
(classify) and fine-tuning (finetune, pairs). loader.open_encoder is the one way to get an encoder. Imports media
and storage, never search; inside, each module imports only those below it (pyproject.toml's layers).
"""
