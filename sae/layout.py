"""The name of every file in a checkpoints tree and of every metric key, defined once.

Training writes these names, the app and the Hub card read them; nobody else spells them out.

```
<root>/<base-model>/<hook_name>/<run>/F<d_sae>/      one SAE folder (SAELens v6)
    cfg.json  sae_weights.safetensors  sparsity.safetensors  metrics.json  training_config.json
    latent_stats.safetensors  loss_curves.csv
    steps/<step>/                                   intermediate SAE folders (+ trainer_state.*)
<root>/<base-model>/<hook_name>/<run>/loss_curves.{csv,png}   every width of a run
<root>/toy/<architecture>-<resampling>/             one toy run
    toy_model.safetensors  toy_model.json  metrics.json  training_config.json  training_log.csv
    features.png  training.gif  inst_XX/ (one SAE folder per instance)
<root>/toy/README.md  <root>/toy/recovery.png       the toy results table and its picture
```
"""

from __future__ import annotations

# --- one SAE folder (SAELens v6 names) --------------------------------------------------------------
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
METRICS_FILE = "metrics.json"
TRAINING_CONFIG_FILE = "training_config.json"
LATENT_STATS_FILE = "latent_stats.safetensors"
"""Per-latent firing statistics and top-activating contexts (sae.latent_stats)."""
STEPS_DIR = "steps"
"""Intermediate checkpoints of an SAE live in `<sae folder>/steps/<step>/`, each a full SAE folder."""

# --- the language-model trainer ---------------------------------------------------------------------
LOSS_CURVES_FILE = "loss_curves.csv"
"""Loss curve of one SAE (in its folder) or of every width of a run (in the run folder)."""
LOSS_CURVES_PLOT = "loss_curves.png"
TRAINER_STATE_JSON = "trainer_state.json"
TRAINER_STATE_TENSORS = "trainer_state.safetensors"
"""Resumable state of an intermediate checkpoint (local only: never uploaded)."""

# --- toy runs ---------------------------------------------------------------------------------------
TOY_MODEL_NAME = "toy-superposition"
"""`metadata.model_name` of toy-model SAEs (never offered as language-model checkpoints)."""
TOY_HOOK_NAME = "hidden"
"""`metadata.hook_name` of toy-model SAEs: the toy model's hidden layer."""
TOY_DIR = "toy"
"""Sub-folder of a checkpoints root holding the toy runs."""
TOY_MODEL_FILE = "toy_model.safetensors"
TOY_CONFIG_FILE = "toy_model.json"
TOY_LOG_FILE = "training_log.csv"
TOY_FEATURES_PLOT = "features.png"
TOY_TRAINING_GIF = "training.gif"
TOY_SUMMARY_FILE = "README.md"
TOY_SUMMARY_PLOT = "recovery.png"
TOY_INSTANCE_PREFIX = "inst_"


def toy_instance_dir(inst: int) -> str:
    """Folder name of toy instance `inst`: inst_00, inst_01, ..."""
    return f"{TOY_INSTANCE_PREFIX}{inst:02d}"


# --- metric keys (definitions: sae.metrics, DESIGN.md "Metrics") ------------------------------------
METRICS_VERSION_KEY = "metrics_version"
MSE = "mse"
VARIANCE_EXPLAINED = "variance_explained"
COSSIM = "cossim"
L2_RATIO = "l2_ratio"
N_ZERO_NORM_INPUTS = "n_zero_norm_inputs"
"""Inputs with zero norm, left out of cossim and l2_ratio (undefined there)."""
L0 = "l0"
FRAC_DEAD = "frac_dead"
FRAC_DENSE = "frac_dense"
N_TOKENS = "n_tokens"
CE_LOSS_WITHOUT_SAE = "ce_loss_without_sae"
CE_LOSS_WITH_SAE = "ce_loss_with_sae"
CE_LOSS_WITH_ABLATION = "ce_loss_with_ablation"
CE_LOSS_SCORE = "ce_loss_score"
KL_DIV_WITH_SAE = "kl_div_with_sae"

RECONSTRUCTION_KEYS = (MSE, VARIANCE_EXPLAINED, COSSIM, L2_RATIO)
SPARSITY_KEYS = (L0, FRAC_DEAD, FRAC_DENSE)
DOWNSTREAM_KEYS = (CE_LOSS_WITHOUT_SAE, CE_LOSS_WITH_SAE, CE_LOSS_WITH_ABLATION, CE_LOSS_SCORE, KL_DIV_WITH_SAE)

# Toy metrics.json
N_ALL_RECOVERED = "n_all_recovered"
BEST_COS = "best_cos"
