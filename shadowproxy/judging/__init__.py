"""Judging: where predictions are in an answer (presets), how two are compared (kinds), the
statistics over many, and the promotion verdict.
"""
