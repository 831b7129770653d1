"""Training of the tiny EDM2 demo models (scikit-learn digits) and the demo's digit detector."""
