"""Where blocks live outside the GPU: the pinned host arena (G2)."""
