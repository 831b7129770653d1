"""Small helpers shared by the samplers and the metrics: errors, weights cache, torchrun."""
