"""Evaluation metrics compatible with EDM2's reference statistics.

FID, sFID and Inception score with the 2015-12-05 Inception-v3, FD-DINOv2 with
DINOv2 ViT-L/14, FD-CLIP with CLIP ViT-L/14, KID, k-NN precision/recall,
density/coverage and saturation, against EDM2's reference pickles or ADM's
reference batches.  Entry points:
:func:`metrics.api.calc_metrics`, :func:`metrics.api.write_metrics` and the
``python -m metrics`` command line.
"""
