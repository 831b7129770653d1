"""Evaluation metrics compatible with EDM2's reference statistics.

FID and Inception score with the 2015-12-05 Inception-v3, FD-DINOv2 with
DINOv2 ViT-L/14, saturation, and k-NN precision/recall.  Entry points:
:func:`metrics.api.calc_metrics`, :func:`metrics.api.write_metrics` and the
``python -m metrics`` command line.
"""
