"""Speech synthesis: a pretrained VITS voice in PyTorch (its ONNX export's weights loaded and checked against ONNX
Runtime), spoken from text through espeak-ng phonemes, and adapted to a new speaker."""
