"""Speech synthesis: a pretrained VITS voice in PyTorch (``vits``: the model; ``voice``: its ONNX export's weights
loaded and checked against ONNX Runtime, espeak-ng phonemes, saved voices), the new speaker's recordings (``data``)
the adaptation to them (``train``: posterior encoder, alignment search, losses, ``adapt``), and how a voice is
measured and shown (``metrics``: speaker similarity, word error rate, mel-cepstral distortion, real-time factor;
``report``: report.html with playable samples)."""
