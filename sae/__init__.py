"""Sparse autoencoders: architectures, checkpoints, base-model hooking, metrics and text analysis."""
