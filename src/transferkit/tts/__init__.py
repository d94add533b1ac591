"""Speech synthesis: a pretrained VITS voice in PyTorch (``vits``: the model; ``voice``: its ONNX export's weights
loaded and checked against ONNX Runtime, espeak-ng phonemes, saved voices), the new speaker's recordings (``data``)
and the adaptation to them (``train``: posterior encoder, alignment search, losses, ``adapt``)."""
