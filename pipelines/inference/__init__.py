"""Inference core: the torch Segmenter, split scoring, images, the torch-free ONNX runtime."""
