"""A pretrained text encoder fine-tuned with LoRA: what ``--model hf:DIR`` trains.

The base, frozen (embeddings included, its dropout off: the DP noise is the
regularizer, and the frozen part computes what it computes at inference); LoRA
adapters (``peft``) on its attention projections; a linear head on the masked
mean of the last hidden states (the pooling sentence encoders are trained
with).  Only the adapters and the head are trainable — all ``nn.Linear``, so
Opacus' ghost clipping covers every trainable layer — and only they are in the
module's ``state_dict``: what travels, what is aggregated, checkpointed and
signed in the model card.  The base is named by its digest instead
(:mod:`fedsilo.shared.pretrained`).

Input: a batch of token ids as float32 (B, max_length), padded with the
tokenizer's pad id, as the schema's ``encoder: model`` text column encodes it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .pretrained import BaseModel, BaseModelError, LoraSettings, offline


class TextModel(nn.Module):
    """Frozen pretrained encoder + LoRA adapters + linear head; ``state_dict`` holds only what trains."""

    # transformers' attention masks branch on values, which torch.func.vmap cannot batch.
    vmap_safe = False

    def __init__(self, base: BaseModel, num_outputs: int, lora: LoraSettings, pad_id: int,
                 base_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        offline()
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        if not (type(num_outputs) is int and num_outputs >= 1):
            raise ValueError(f"a text model needs at least one output, got {num_outputs!r}")
        try:
            if torch.empty(0).device.type == "meta":  # shapes only (a department admitting a run's model)
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(str(base.folder), local_files_only=True, trust_remote_code=False)
                encoder = AutoModel.from_config(config, trust_remote_code=False)
            else:
                encoder = AutoModel.from_pretrained(str(base.folder), local_files_only=True, use_safetensors=True,
                                                    trust_remote_code=False, dtype=base_dtype)
        except (OSError, ValueError, KeyError) as err:
            raise BaseModelError(f"base model folder '{base.folder}' does not load with transformers: {err}") from None
        for p in encoder.parameters():
            p.requires_grad_(False)
        for module in encoder.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        try:
            adapters = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, bias="none",
                                target_modules=list(lora.targets) or None)
            # autocast_adapter_dtype: the adapters stay float32 on a bfloat16 base, so every per-example
            # norm, clip factor and noise draw is float32 arithmetic.
            self.encoder = get_peft_model(encoder, adapters, autocast_adapter_dtype=True)
        except ValueError as err:
            raise BaseModelError(
                f"LoRA cannot be applied to this {base.model_type} base: {err}; name its attention "
                "projections with --lora-targets (e.g. query,value or q_proj,v_proj)"
            ) from None
        # The modules LoRA adapted, named: a run sends them, so every party builds the same layout
        # whatever its peft version's defaults.
        adapted = self.encoder.peft_config["default"].target_modules
        self.lora = LoraSettings(lora.rank, lora.alpha, tuple(sorted(adapted)) if not isinstance(adapted, str) else (adapted,))
        self.head = nn.Linear(base.hidden_size, num_outputs)
        self.pad_id = int(pad_id)
        self.vocab_size = base.vocab_size
        self.travelling = tuple(n for n, p in self.named_parameters() if p.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.reshape(len(x), -1).round().long().clamp(0, self.vocab_size - 1)
        mask = (ids != self.pad_id).long()
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weight = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weight).sum(1) / weight.sum(1).clamp(min=1.0)
        return self.head(pooled.float())

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        full = super().state_dict(prefix=prefix, keep_vars=keep_vars)
        out = destination if destination is not None else OrderedDict()
        for name in self.travelling:
            out[prefix + name] = full[prefix + name]
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        keys = set(state_dict)
        missing = [k for k in self.travelling if k not in keys]
        unexpected = sorted(keys - set(self.travelling))
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"a text model's state holds exactly its adapters and head: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return super().load_state_dict(state_dict, strict=False, assign=assign)


def build_text_model(base: BaseModel, num_outputs: int, lora: LoraSettings, pad_id: int, seed: int = 0,
                     base_dtype: torch.dtype = torch.float32) -> TextModel:
    """A :class:`TextModel` on ``base`` whose adapters and head are initialized from ``seed`` (a forked RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TextModel(base, num_outputs, lora, pad_id, base_dtype)
    if not all(v.dtype == torch.float32 for v in model.state_dict().values()):
        raise BaseModelError("the adapters and head of a pretrained model must be float32 (peft kept them in "
                             "the base's dtype); use --base-dtype float32")
    return model


def resolve_base_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``auto``: bfloat16 on a CUDA device that has it (the frozen base only), float32 elsewhere."""
    if name == "bfloat16":
        return torch.bfloat16
    if name == "auto" and torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def traffic(model: nn.Module) -> dict[str, int]:
    """Parameters that travel (adapters, head) against the whole model's."""
    return {"travelling_parameters": int(sum(v.numel() for v in model.state_dict().values())),
            "total_parameters": int(sum(p.numel() for p in model.parameters()))}
