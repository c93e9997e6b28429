"""Causal checks beside the map: block attention edges, ablate heads, patch the residual stream, and read
how a generated token's probability changes (`knockout`, `patching`, `sweep`; the decoder edits they run
inside the recording attention function are in `edits`)."""
