"""Toy models of superposition and the SAEs trained on their hidden activations.

model.py          the toy model, its (compact, batched) sampling, its training and its files
sae_training.py   one batched SAE over every instance: config, training loop, training log
run_folder.py     evaluation, metrics.json, the run folder (and re-evaluating a written one)
plots.py          features.png, training.gif, recovery.png
cli.py            `python -m training toy`
"""
