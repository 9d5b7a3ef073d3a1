"""Code shared by every op package: argument checks, the compute dtype, the capability records, dispatch between
the compiled and the pure-PyTorch paths, and the helpers of the reference paths (docs/design.md §6)."""
