"""Loading a checkpoint safely: the config, the processor and the weights, each checked before the
next is touched, so a bad folder is refused with a message before anything large is allocated.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from errors import ModelLoadError
from families import check_transformers, detect_family, load_attention


def check_weights_cover_config(folder: Path, config) -> None:
    """Refuse, before allocating anything, a folder whose safetensors files are missing, unreadable or
    hold fewer parameters than its config declares (counted on the meta device)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [path.name for path in folder.glob("*.bin")] + [path.name for path in folder.glob("*.pt")]
        raise ModelLoadError(
            f"No .safetensors weights in {str(folder)!r}"
            + (
                f" (only {', '.join(pickled[:3])}: pickle files are refused because loading them can run code)"
                if pickled
                else ""
            )
            + ". Convert the weights to safetensors or download them again."
        )
    stored = 0
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as weights:
                stored += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
        except Exception as err:  # safetensors raises its own error types
            raise ModelLoadError(
                f"The weights file {path.name} is unreadable or truncated ({err}). Download it again."
            ) from err
    with torch.device("meta"):
        declared = AutoModelForImageTextToText.from_config(config).num_parameters()
    if stored < 0.95 * declared:
        raise ModelLoadError(
            f"{str(folder)!r} holds {stored:,} weights but its config declares {declared:,}. "
            "The download is incomplete or the weights belong to another config."
        )


def _read_config(model_id: str, trust_remote_code: bool):
    looks_local = Path(model_id).is_absolute() or model_id.startswith((".", "~")) or Path(model_id).exists()
    if looks_local and not Path(model_id).expanduser().is_dir():
        raise ModelLoadError(
            f"No local folder {model_id!r}. Check the path, or give a hub id such as Qwen/Qwen2.5-VL-3B-Instruct."
        )
    try:
        return AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except Exception as err:  # missing, unreadable or invalid
        where = "local folder" if looks_local else "hub id"
        raise ModelLoadError(
            f"Could not load {model_id!r} as a {where}: {err}. Check the spelling; for a hub id, check the "
            "network (with HF_HUB_OFFLINE=1 only models already in the local cache load), or download the "
            "model once and pass its local folder."
        ) from err


def load_checkpoint(model_id: str, device: str, torch_dtype: torch.dtype, trust_remote_code: bool = False):
    """(model in eval mode on `device`, processor, family) of a checkpoint of a supported family."""
    config = _read_config(model_id, trust_remote_code)
    family = detect_family(config)
    check_transformers(family)
    try:
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as err:
        cause = str(err).split(". ")[0][:160]  # the library's first sentence, bounded
        raise ModelLoadError(
            f"{model_id!r} has no usable processor ({cause}). A checkpoint folder needs its "
            "preprocessor, tokenizer and chat template files beside the weights."
        ) from err
    if Path(model_id).expanduser().is_dir():
        check_weights_cover_config(Path(model_id).expanduser(), config)
    placement = {"device_map": "auto"} if device == "cuda" else {}
    try:
        model, info = AutoModelForImageTextToText.from_pretrained(
            model_id,
            dtype=torch_dtype,
            attn_implementation=load_attention(family),
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            **placement,
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelLoadError(
            f"Could not load the weights of {model_id!r}: {err}. Check that the download "
            "finished and that the weights belong to this config."
        ) from err
    missing = list(info.get("missing_keys", [])) + [key for key, *_ in info.get("mismatched_keys", [])]
    if missing:
        raise ModelLoadError(
            f"The weights of {model_id!r} do not match its config: {len(missing)} tensors are "
            f"missing or of the wrong shape (e.g. {missing[0]}). Use the weights that belong "
            "to this checkpoint."
        )
    if not placement:
        model.to(device)
    model.eval()
    return model, processor, family
