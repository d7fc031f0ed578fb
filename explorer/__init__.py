"""The SAE explorer app: analysis of a text, latents across widths, interventions, and the Gradio UI.

`sae/` is the library (architectures, checkpoints, base-model hooking and splicing, metrics); this package
holds everything app-only: `analyze` (text -> latents and metrics), `latents`, `links`, `intervene`,
`render` (HTML), `catalog`, `cache`, `handlers` (plain functions behind every UI event), `ui` (Gradio
wiring) and `serve` (command line, launch).
"""
