"""Text encoder (Section 3.3, Eq. 3): the frozen BiomedCLIP text tower.

A prompt p becomes token embeddings T (L, d_t) with a padding mask, the pooled embedding t-bar (d_t, BiomedCLIP's
pooled [CLS] token) and the CLIP joint-space embedding (d_clip, used by the UNet-CLIP baseline and zero-shot
retrieval). The tower is frozen and prompts repeat across a data set, so features are cached per prompt;
BERT runs on the prompt's real token length, not on 256 pads.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn


class TextFeatures(NamedTuple):
    """Encoded prompts of a batch."""

    tokens: Tensor        # (B, L, d_t) last hidden states, [CLS] ... [SEP] then zeros
    padding: Tensor       # (B, L) bool, True where a token is padding
    pooled: Tensor        # (B, d_t) t-bar
    embedding: Tensor     # (B, d_clip) CLIP joint-space embedding (not normalised)


class PromptError(ValueError):
    """A prompt the model cannot use (empty or not a string)."""


class TextEncoder(nn.Module):
    """Frozen CLIP text tower with a per-prompt feature cache.

    Args:
        clip_text: open_clip ``HFTextEncoder`` (``.transformer``, ``.pooler``, ``.proj``).
        tokenizer: its HuggingFace tokenizer.
        context_length: longest prompt in tokens (including [CLS] and [SEP]); longer ones are truncated
            with a warning.
        cache_size: prompts kept in the cache (least recently used are dropped).
    """

    def __init__(self, clip_text: nn.Module, tokenizer, context_length: int = 77, cache_size: int = 4096) -> None:
        super().__init__()
        self.clip_text = clip_text
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[Tensor, Tensor, Tensor]] = OrderedDict()
        self._cache_lock = threading.Lock()   # ensembles share this encoder, and a server calls it from threads
        self.width = clip_text.config.hidden_size                                  # d_t
        self.embedding_width = _output_width(clip_text.proj)                       # d_clip

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        self.clip_text.eval()  # frozen: dropout stays off
        return self

    def _apply(self, fn, recurse: bool = True):
        self._cache.clear()  # cached tensors live on the old device / dtype
        return super()._apply(fn, recurse)

    @torch.inference_mode(False)  # cached features must stay usable outside inference mode
    @torch.no_grad()
    def _encode(self, prompt: str) -> tuple[Tensor, Tensor, Tensor]:
        """One prompt, unpadded and in fp32, so cached features never depend on batch-mates or autocast."""
        device = next(self.clip_text.parameters()).device
        ids = self.tokenizer(prompt)["input_ids"]
        if len(ids) > self.context_length:
            warnings.warn(f"prompt {prompt[:60]!r} has {len(ids)} tokens; truncated to {self.context_length}",
                          stacklevel=4)
            ids = ids[: self.context_length - 1] + [self.tokenizer.sep_token_id]
        ids = torch.tensor([ids], device=device)
        attention = torch.ones_like(ids)
        with torch.autocast(device.type, enabled=False):
            out = self.clip_text.transformer(input_ids=ids, attention_mask=attention)
            pooled = self.clip_text.pooler(out, attention)                           # (1, d_t)
            embedding = self.clip_text.proj(pooled)                                  # (1, d_clip)
        return out.last_hidden_state[0].float(), pooled[0].float(), embedding[0].float()

    def forward(self, prompts: Sequence[str]) -> TextFeatures:
        """Encode a batch of prompt strings (cached); returns padded :class:`TextFeatures`."""
        prompts = [_check_prompt(p) for p in prompts]
        with self._cache_lock:
            for prompt in prompts:
                if prompt not in self._cache:
                    self._cache[prompt] = self._encode(prompt)
                self._cache.move_to_end(prompt)
            entries = [self._cache[p] for p in prompts]
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        tokens = nn.utils.rnn.pad_sequence([e[0] for e in entries], batch_first=True)  # (B, L, d_t)
        lengths = torch.tensor([len(e[0]) for e in entries], device=tokens.device)
        padding = torch.arange(tokens.shape[1], device=tokens.device)[None] >= lengths[:, None]
        pooled = torch.stack([e[1] for e in entries])
        embedding = torch.stack([e[2] for e in entries])
        return TextFeatures(tokens, padding, pooled, embedding)


def _check_prompt(prompt: object) -> str:
    if not isinstance(prompt, str):
        raise PromptError(f"a prompt must be a string, got {type(prompt).__name__}")
    cleaned = " ".join(prompt.split())
    if not cleaned:
        raise PromptError("the prompt is empty: describe the structure to segment, e.g. 'brain tumour'")
    return cleaned


def _output_width(module: nn.Module) -> int:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features
