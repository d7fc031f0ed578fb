"""Offline training: toy models of superposition, the TinyStories pipeline, the mini base LM, Hub upload."""
