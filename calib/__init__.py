"""Texts that qconvert ships, installed as the package ``qconvert.calibdata``; read them through ``qconvert.texts``.

``*.txt``: the built-in calibration set; ``eval/``: the frozen held-out evaluation text (checked by sha256).
"""
