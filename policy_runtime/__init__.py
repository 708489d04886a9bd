"""Serving side: wire protocol, ONNX Runtime / torch backends, ZeroMQ server and client, chunk execution.

Must stay light: nothing here imports torch or sim_trainer on the ONNX path (a robot-side install).
"""
