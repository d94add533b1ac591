"""Speech synthesis: a pretrained VITS voice in PyTorch (its ONNX export's weights loaded and checked against ONNX
Runtime), spoken from text through espeak-ng phonemes, and adapted to a new speaker.

- ``transferkit.tts.vits``: the VITS inference model (``VITS``, ``VitsConfig``), written from the paper, with the
  randomness as an explicit input;
- ``transferkit.tts.voice``: ``load_voice`` (ONNX voice -> ``Voice`` with the transfer report), text -> phoneme ids,
  ``Voice.speak``, ``write_wav``.

The layer builds on forward transfer (``transferkit.transfer``): the ONNX weights reach the module through it.
"""
