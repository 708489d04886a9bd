"""Export of the K-step denoiser to ONNX with a manifest (contract 3)."""
