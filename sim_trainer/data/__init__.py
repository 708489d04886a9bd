"""Episode datasets (one on-disk format for sim, real-proxy and real data), demos, normalisation."""
