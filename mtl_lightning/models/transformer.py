"""A pretrained Hugging Face transformer as the shared encoder, loaded from a local folder.

Nothing is downloaded at run time: ``path`` is a directory written by ``save_pretrained`` (or a
``snapshot_download`` made once on a machine with network access). Needs the ``hf`` extra
(``pip install "mtl-lightning[hf]"``).

The batch carries the tokens as a dict under the model's ``input_key``:
``{"input": {"input_ids": (B, L) long, "attention_mask": (B, L)}, <label keys>…}``
(:class:`~mtl_lightning.data.TensorDictDataset` holds such nested inputs). A bare tensor is taken as
``input_ids`` with every position attended.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from mtl_lightning.extras import check_model_dir, require

POOLINGS = ("cls", "mean", "last_token", "tokens")


class TransformerEncoder(nn.Module):
    """Any Hugging Face ``AutoModel`` from a local directory, pooled to one feature vector per sample.

    Args:
        path: Folder with ``config.json`` and the weights (``local_files_only``: never downloads).
        pooling: ``"cls"`` (first token), ``"mean"`` (mean over attended tokens, as sentence-transformers),
            ``"last_token"`` (last attended token, for decoder models) or ``"tokens"`` (per-token features
            (B, L, H), for token-level tasks).
        trainable: Train the transformer's weights (False: they stay fixed).
        gradient_checkpointing: Recompute each layer's activations in the backward pass instead of keeping
            them (the model's ``gradient_checkpointing_enable``, non-reentrant): less activation memory for
            about one more forward pass. Every gradient-method mode and engine works with it.

    ``out_features`` is the model's hidden size. ``backbone`` is the Hugging Face model (LoRA adapters
    and ``save_pretrained`` act on it).

    Examples:
        A tiny random BERT saved to a folder, then read back:

        >>> import tempfile, torch
        >>> from transformers import BertConfig, BertModel
        >>> from mtl_lightning.models import TransformerEncoder
        >>> _ = torch.manual_seed(0)
        >>> folder = tempfile.mkdtemp()
        >>> BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...                      intermediate_size=32)).save_pretrained(folder)
        >>> encoder = TransformerEncoder(folder, pooling="mean")
        >>> tokens = {"input_ids": torch.randint(1, 50, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
        >>> encoder.out_features, tuple(encoder(tokens).shape)
        (16, (3, 16))
    """

    def __init__(self, path: str, pooling: str = "cls", trainable: bool = True,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"TransformerEncoder: pooling must be one of {list(POOLINGS)}, got {pooling!r}.")
        transformers = require("transformers", "hf")
        self.path = check_model_dir(path, "TransformerEncoder")
        self.backbone = transformers.AutoModel.from_pretrained(self.path, local_files_only=True)
        self.pooling = pooling
        self.out_features: int = int(self.backbone.config.hidden_size)
        self.backbone.requires_grad_(trainable)
        if gradient_checkpointing:
            if not getattr(self.backbone, "supports_gradient_checkpointing", False):
                raise ValueError(f"TransformerEncoder: {type(self.backbone).__name__} ({self.path}) does not support "
                                 "gradient checkpointing; set gradient_checkpointing: false.")
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.backbone.train()  # from_pretrained returns it in eval mode; Lightning keeps modes as it finds them

    def forward(self, x: Any) -> Tensor:
        if isinstance(x, Tensor):
            x = {"input_ids": x, "attention_mask": torch.ones_like(x)}
        if not isinstance(x, Mapping) or "input_ids" not in x:
            raise TypeError(
                "TransformerEncoder: the batch input must be a dict with 'input_ids' (and 'attention_mask'), or a tensor "
                f"of input ids; got {type(x).__name__}{' with keys ' + str(sorted(x)) if isinstance(x, Mapping) else ''}."
            )
        mask = x.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(x["input_ids"])
        kwargs = {k: v for k, v in x.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        kwargs["attention_mask"] = mask
        hidden = self.backbone(**kwargs).last_hidden_state  # (B, L, H)
        if self.pooling == "tokens":
            return hidden
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.to(hidden.dtype)
        if self.pooling == "mean":
            return (hidden * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp_min(1.0)
        # last attended position of each row (right padding; with left padding the last position)
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask.bool(), positions, torch.zeros_like(positions)).amax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
