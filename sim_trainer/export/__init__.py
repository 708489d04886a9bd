"""Export of the K-step denoiser to ONNX with a manifest: the export directory that policy-runtime serves."""
