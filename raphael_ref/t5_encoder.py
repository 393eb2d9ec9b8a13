"""Frozen T5 text encoder (seed 004, Imagen; seed 003, eDiff-I): prompts -> text tokens (B, n_y, d_y).

An alternative E_theta to the OpenCLIP tower of RAPHAEL Table 2 (``model.text_encoder = "t5"`` with
``model.text_encoder_weights = <local folder>``). Imagen conditions its diffusion models on a frozen
T5-XXL encoder's token states; eDiff-I on T5 beside CLIP. The encoder is ``transformers``'
``T5EncoderModel`` and the folder's own tokenizer, read from local files only (nothing downloads):

    ids    = tokenizer(prompt)[:n_y - 1] + [</s>], padded with <pad> to n_y     # (B, n_y) long
    hidden = final_layer_norm(block_L(... block_1(embed[ids]; mask)))           # (B, n_y, d_model)

Differences from the CLIP tower, and how they map onto the U-Net's inputs (decision D-T5 in
``spec/errata.md``): T5 has no start token, its attention is bidirectional under the padding mask
(so the states of the prompt's tokens do not depend on the padding length, tested), and its "pooled"
token is the end-of-sequence token ``</s>``, the last valid position: ``pooled_index`` points there
and ``valid`` marks positions 0..pooled_index, as for CLIP (E40). Only ``layer="last"`` (the
encoder's output after its final layer norm, as Imagen uses it) is offered. A prompt with more than
n_y - 1 tokens keeps its first n_y - 1 and ends with ``</s>``, with a
:class:`~raphael_ref.text_encoder.PromptTruncatedWarning`, as the CLIP path does (E41).

The folder is what ``T5EncoderModel.save_pretrained`` and the tokenizer's ``save_pretrained`` write
(``config.json``, ``model.safetensors``, ``tokenizer.json`` ...), e.g. the ``text_encoder`` and
``tokenizer`` files of a T5 release put side by side. Needs ``transformers`` (extra ``t5``).

eDiff-I's joint text encoding (seed 003; ``model.text_encoder = "t5+clip"``, decision E78 in
``spec/errata.md``, spec ``text.t5_clip_concat``): :class:`T5ClipTextEncoder` runs this T5 encoder and a
frozen CLIP text tower (:class:`~raphael_ref.text_encoder.TextEncoder`) on the same prompt and puts their
tokens on one token axis, T5's first. The two widths differ (T5-XXL 4096, CLIP L/14 768), so each encoder
keeps its own block of channels (:func:`concat_text_tokens`):

    y = [[T5 hidden, 0], [0, CLIP hidden]]      # (B, n_t5 + n_clip, d_t5 + d_clip)

which lets the U-Net's key / value projections and text gate act on the two as two separate learned linear
maps (no trained projection outside the U-Net, nothing in the frozen encoder to train).
"""

from __future__ import annotations

import types
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from raphael_ref.text_encoder import PromptTruncatedWarning, TextEncoding, prompt_list

__all__ = ["T5ClipTextEncoder", "T5TextEncoder", "build_t5_text_encoder", "concat_text_tokens", "write_tiny_t5"]


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the test extra installs it
        raise ImportError("the T5 text encoder needs transformers: pip install 'raphael_ref[t5]'") from e
    return transformers


class T5TextEncoder(nn.Module):
    """Frozen T5 encoder with the interface of :class:`~raphael_ref.text_encoder.TextEncoder`.

    Build with :meth:`from_pretrained` (a local folder). Calling it on prompts (or ids from
    :meth:`tokenize`) returns a :class:`~raphael_ref.text_encoder.TextEncoding`; it never builds a graph.
    """

    def __init__(self, model: nn.Module, tokenizer, n_y: int = 77, name: str = "t5") -> None:
        super().__init__()
        if n_y < 2:
            raise ValueError(f"n_y must be >= 2 (a token and </s>), got {n_y}")
        for attr in ("pad_token_id", "eos_token_id"):
            if getattr(tokenizer, attr, None) is None:
                raise ValueError(f"the T5 tokenizer has no {attr.removesuffix('_id')} token; a T5 tokenizer "
                                 f"defines <pad> and </s>")
        self.model = model
        self.tokenizer = tokenizer
        self._n_y = int(n_y)
        self.name = name
        self._freeze()

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, n_y: int = 77, layer: str = "last",
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "T5TextEncoder":
        """Read the encoder and its tokenizer from a local folder (never downloads)."""
        if layer != "last":
            raise ValueError(f"the T5 text encoder offers layer='last' only (its output after the final layer norm, "
                             f"as Imagen uses it), got {layer!r}; set model.text_layer=last")
        folder = Path(folder) if folder is not None else None
        if folder is None or not folder.is_dir() or not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"T5 text encoder folder {folder} not found (or without config.json). Set "
                f"model.text_encoder_weights to a local folder holding a T5 encoder and its tokenizer "
                f"(config.json, model.safetensors, tokenizer.json: what T5EncoderModel.save_pretrained and the "
                f"tokenizer's save_pretrained write). Nothing is downloaded.")
        tf = _transformers()
        model = tf.T5EncoderModel.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype or torch.float32)
        tokenizer = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        enc = cls(model, tokenizer, n_y=n_y, name=f"t5:{folder.name}")
        return enc.to(device=torch.device(device) if device is not None else torch.device("cpu"))

    def _freeze(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)

    def train(self, mode: bool = True) -> "T5TextEncoder":
        """Stays in eval mode: E_theta is frozen (no dropout, no gradients)."""
        return super().train(False)

    @property
    def config(self) -> types.SimpleNamespace:
        """``name``, ``d_y``, ``n_y``, ``layer``: what callers read of the CLIP tower's ``config``."""
        return types.SimpleNamespace(name=self.name, d_y=self.d_y, n_y=self.n_y, layer="last")

    @property
    def d_y(self) -> int:
        return int(self.model.config.d_model)

    @property
    def n_y(self) -> int:
        return self._n_y

    @property
    def layer(self) -> str:
        return "last"

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """T5 ids (B, n_y) long: [tokens, </s>, <pad>...]; long prompts truncated with a warning."""
        prompts = prompt_list(prompts)
        tok = self.tokenizer
        for b, p in enumerate(prompts):
            n = len(tok(p)["input_ids"])  # with </s>
            if n > self.n_y:
                shown = p if len(p) <= 60 else p[:57] + "..."
                warnings.warn(PromptTruncatedWarning(
                    f"prompt {b} ({shown!r}) has {n - 1} T5 tokens but only {self.n_y - 1} fit in the context of "
                    f"{self.n_y}; dropped the last {n - self.n_y} tokens"), stacklevel=2)
        enc = tok(list(prompts), padding="max_length", max_length=self.n_y, truncation=True, return_tensors="pt")
        return enc["input_ids"].long()  # (B, n_y)

    def _valid_and_pooled(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """valid (B, n_y): positions up to and including the first </s>; pooled_index (B,): that position."""
        eos = ids == self.tokenizer.eos_token_id  # (B, n_y)
        if not bool(eos.any(dim=1).all()):
            raise ValueError(f"every row of ids must contain the end-of-sequence id {self.tokenizer.eos_token_id} "
                             f"(</s>); build ids with .tokenize(prompts)")
        pooled_index = eos.long().argmax(dim=1)  # (B,) first </s>
        valid = torch.arange(ids.shape[1], device=ids.device)[None, :] <= pooled_index[:, None]
        return valid, pooled_index

    @torch.no_grad()
    def forward(self, prompts_or_ids: str | Sequence[str] | torch.Tensor) -> TextEncoding:
        """Encode prompts (or ids from :meth:`tokenize`) into text tokens y (B, n_y, d_y)."""
        if isinstance(prompts_or_ids, torch.Tensor):
            ids = prompts_or_ids
            if ids.dtype not in (torch.long, torch.int32) or ids.dim() != 2 or ids.shape[1] != self.n_y:
                raise ValueError(f"ids must be an integer tensor of shape (B, {self.n_y}), got "
                                 f"{tuple(ids.shape)} {ids.dtype}; use .tokenize(prompts)")
        else:
            ids = self.tokenize(prompts_or_ids)
        device = next(self.model.parameters()).device
        ids = ids.to(device=device, dtype=torch.long)
        valid, pooled_index = self._valid_and_pooled(ids)
        hidden = self.model(input_ids=ids, attention_mask=valid.long()).last_hidden_state  # (B, n_y, d_y)
        pooled = hidden[torch.arange(ids.shape[0], device=device), pooled_index]  # (B, d_y)
        return TextEncoding(hidden=hidden, pooled_index=pooled_index, valid=valid, pooled=pooled, ids=ids)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, d_y={self.d_y}, n_y={self.n_y}, layer='last'"


def write_tiny_t5(folder: str | Path, words: Sequence[str] = (), *, d_model: int = 32, layers: int = 2,
                  seed: int = 0) -> Path:
    """Write a random-init tiny T5 encoder and a word-level tokenizer to ``folder`` (tests, toy runs).

    The tokenizer knows the synthetic prompts' words (``raphael_ref.data``'s vocabulary plus ``words``)
    and ends every prompt with ``</s>``, as T5's does; the files are those a real T5 folder holds, so
    :meth:`T5TextEncoder.from_pretrained` reads them through the same code.
    """
    tf = _transformers()
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    base = ("a an the of and on in at to with left right top bottom above below next one two three four red green "
            "blue yellow purple white black circle circles square squares triangle triangles").split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in [*base, *words]:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    cfg = tf.T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=layers,
                      num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tf.T5EncoderModel(cfg).save_pretrained(str(folder))
    return folder


# ---------------------------------------------------------------------------------------------
# eDiff-I: T5 and CLIP tokens on one token axis (seed 003; E78)


def concat_text_tokens(t5: TextEncoding, clip: TextEncoding) -> TextEncoding:
    """eDiff-I (seed 003) T5 + CLIP text tokens, E78: y = [[H_t5, 0], [0, H_clip]] on one token axis.

    t5:   TextEncoding with hidden (B, n_t, d_t), valid (B, n_t), pooled_index (B,), ids (B, n_t)
    clip: TextEncoding with hidden (B, n_c, d_c), valid (B, n_c), pooled_index (B,), ids (B, n_c)

    Returns a TextEncoding of n_y = n_t + n_c tokens of width d_y = d_t + d_c:

        hidden[:, j]       = [H_t5[:, j], 0_{d_c}]         for j < n_t    (T5's tokens, its padding too)
        hidden[:, n_t + j] = [0_{d_t}, H_clip[:, j]]       for j < n_c    (CLIP's tokens)
        valid              = [valid_t5, valid_clip]                          (B, n_y)
        pooled_index       = n_t + pooled_index_clip                         (CLIP's end-of-text token, E39)
        pooled             = hidden[b, pooled_index[b]] = [0, pooled_clip]   (B, d_y)
        ids                = [ids_t5, ids_clip]                              (B, n_y)

    ``valid`` is True on two runs of positions (T5's tokens through ``</s>``, CLIP's SOT through EOT), not on
    the prefix 0..pooled_index as for one encoder (E40): every reader of ``valid`` (cross-attention key mask,
    space-MoE token count) takes it position by position. Plain copies: exact in every dtype.
    """
    for name, enc in (("t5", t5), ("clip", clip)):
        h = enc.hidden
        if not isinstance(h, torch.Tensor) or h.dim() != 3:
            raise ValueError(f"concat_text_tokens: {name}.hidden must be (B, n, d), got {getattr(h, 'shape', type(h))}")
        B, n, _ = h.shape
        if enc.valid.shape != (B, n) or enc.valid.dtype != torch.bool:
            raise ValueError(f"concat_text_tokens: {name}.valid must be a bool tensor of shape ({B}, {n}), got "
                             f"{tuple(enc.valid.shape)} {enc.valid.dtype}")
        if enc.pooled_index.shape != (B,) or enc.pooled_index.dtype != torch.long:
            raise ValueError(f"concat_text_tokens: {name}.pooled_index must be a long tensor of shape ({B},), got "
                             f"{tuple(enc.pooled_index.shape)} {enc.pooled_index.dtype}")
    if t5.hidden.shape[0] != clip.hidden.shape[0]:
        raise ValueError(f"concat_text_tokens: the T5 and CLIP encodings hold {t5.hidden.shape[0]} and "
                         f"{clip.hidden.shape[0]} prompts; encode the same prompts with both")
    if t5.hidden.dtype != clip.hidden.dtype or t5.hidden.device != clip.hidden.device:
        raise ValueError(f"concat_text_tokens: hidden states in {t5.hidden.dtype} on {t5.hidden.device} (T5) and "
                         f"{clip.hidden.dtype} on {clip.hidden.device} (CLIP); put both encoders on one dtype and device")
    B, n_t, d_t = t5.hidden.shape
    n_c, d_c = clip.hidden.shape[1:]
    hidden = t5.hidden.new_zeros(B, n_t + n_c, d_t + d_c)  # (B, n_y, d_y)
    hidden[:, :n_t, :d_t] = t5.hidden  # T5 block
    hidden[:, n_t:, d_t:] = clip.hidden  # CLIP block
    valid = torch.cat([t5.valid, clip.valid.to(t5.valid.device)], dim=1)  # (B, n_y)
    pooled_index = n_t + clip.pooled_index.to(hidden.device)  # (B,) CLIP's EOT
    pooled = hidden[torch.arange(B, device=hidden.device), pooled_index]  # (B, d_y)
    ids = torch.cat([t5.ids.to(hidden.device), clip.ids.to(hidden.device)], dim=1)  # (B, n_y)
    return TextEncoding(hidden=hidden, pooled_index=pooled_index, valid=valid, pooled=pooled, ids=ids)


class T5ClipTextEncoder(nn.Module):
    """eDiff-I's frozen T5 + CLIP text encoding (seed 003; E78), with the interface of
    :class:`~raphael_ref.text_encoder.TextEncoder`: n_y = T5's n_y + CLIP's context, d_y = d_t5 + d_clip.

    Build with :meth:`from_pretrained` (local files) or from a :class:`T5TextEncoder` and a
    :class:`~raphael_ref.text_encoder.TextEncoder`. Both stay frozen (eval mode, no gradients).
    """

    def __init__(self, t5: T5TextEncoder, clip, name: str | None = None) -> None:
        super().__init__()
        if not isinstance(t5, T5TextEncoder):
            raise ValueError(f"t5 must be a T5TextEncoder, got {type(t5).__name__}")
        is_t5 = isinstance(clip, (T5TextEncoder, T5ClipTextEncoder))
        if is_t5 or not all(hasattr(clip, a) for a in ("tokenize", "d_y", "n_y")):
            raise ValueError(f"clip must be a CLIP text tower (raphael_ref.text_encoder.TextEncoder), got "
                             f"{type(clip).__name__}")
        self.t5 = t5
        self.clip = clip
        self.name = name or f"{t5.name}+{getattr(getattr(clip, 'config', None), 'name', '') or 'clip'}"
        self.requires_grad_(False)
        super().train(False)

    @classmethod
    def from_pretrained(cls, t5_folder: str | Path, clip: Any, clip_weights: str | Path | None = None, *,
                        n_y: int = 154, clip_layer: str = "last", device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> "T5ClipTextEncoder":
        """T5 from ``t5_folder`` (:meth:`T5TextEncoder.from_pretrained`) and the CLIP tower ``clip`` (a name,
        JSON file or folder of :meth:`TextEncoder.from_config`, e.g. ``"ViT-L-14"``, with ``clip_weights``, a
        local file). ``n_y`` is the joint length: T5 gets n_y minus CLIP's context (77 for every CLIP)."""
        from raphael_ref.text_encoder import TextEncoder

        clip_enc = TextEncoder.from_config(clip, clip_weights, layer=clip_layer, seed=0, device=device, dtype=dtype)
        n_t5 = int(n_y) - clip_enc.n_y
        if n_t5 < 2:
            raise ValueError(f"config field model.n_y: {n_y} leaves {n_t5} T5 positions beside CLIP's context of "
                             f"{clip_enc.n_y}; with model.text_encoder='t5+clip' model.n_y is the T5 length plus "
                             f"{clip_enc.n_y}, e.g. model.n_y={77 + clip_enc.n_y} for 77 T5 tokens")
        t5 = T5TextEncoder.from_pretrained(t5_folder, n_y=n_t5, device=device, dtype=dtype)
        return cls(t5, clip_enc)

    def train(self, mode: bool = True) -> "T5ClipTextEncoder":
        """Stays in eval mode: both encoders are frozen."""
        return super().train(False)

    @property
    def n_t5(self) -> int:
        return self.t5.n_y

    @property
    def n_y(self) -> int:
        return self.t5.n_y + self.clip.n_y

    @property
    def d_y(self) -> int:
        return self.t5.d_y + self.clip.d_y

    @property
    def layer(self) -> str:
        return self.clip.layer  # T5's is always "last"

    @property
    def config(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(name=self.name, d_y=self.d_y, n_y=self.n_y, layer=self.layer)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """(B, n_y) long: T5's ids (n_t5) then CLIP's (CLIP's context); each truncates with a warning."""
        prompts = prompt_list(prompts)
        return torch.cat([self.t5.tokenize(prompts), self.clip.tokenize(prompts)], dim=1)

    @torch.no_grad()
    def forward(self, prompts_or_ids: str | Sequence[str] | torch.Tensor) -> TextEncoding:
        """Encode prompts (or ids from :meth:`tokenize`) into text tokens y (B, n_y, d_y) (E78)."""
        if isinstance(prompts_or_ids, torch.Tensor):
            ids = prompts_or_ids
            if ids.dim() != 2 or ids.shape[1] != self.n_y:
                raise ValueError(f"ids must have shape (B, {self.n_y}) (T5's {self.n_t5} then CLIP's {self.clip.n_y}), "
                                 f"got {tuple(ids.shape)}; use .tokenize(prompts)")
            t5, clip = self.t5(ids[:, :self.n_t5]), self.clip(ids[:, self.n_t5:])
        else:
            prompts = prompt_list(prompts_or_ids)
            t5, clip = self.t5(prompts), self.clip(prompts)
        return concat_text_tokens(t5, clip)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, d_y={self.d_y} ({self.t5.d_y} + {self.clip.d_y}), n_y={self.n_y} " \
               f"({self.n_t5} + {self.clip.n_y})"


def build_t5_text_encoder(model_cfg, device: str | torch.device = "cpu"):
    """E_theta of a model config with ``text_encoder`` "t5" (:class:`T5TextEncoder`) or "t5+clip"
    (:class:`T5ClipTextEncoder`: T5 from ``text_encoder_weights``, the CLIP tower ``text_encoder_clip`` with
    ``text_encoder_clip_weights``, ``text_layer`` for CLIP). ``training.build_text_encoder`` dispatches here."""
    m = model_cfg
    if m.text_encoder == "t5":
        return T5TextEncoder.from_pretrained(m.text_encoder_weights, n_y=m.n_y, layer=m.text_layer, device=device)
    if m.text_encoder == "t5+clip":
        clip = getattr(m, "text_encoder_clip", None)
        if not clip:
            raise ValueError("config field model.text_encoder_clip: model.text_encoder='t5+clip' needs the CLIP tower "
                             "(an open_clip name such as 'ViT-L-14', 'toy-clip', a JSON file or a folder)")
        return T5ClipTextEncoder.from_pretrained(m.text_encoder_weights, clip,
                                                 getattr(m, "text_encoder_clip_weights", None),
                                                 n_y=m.n_y, clip_layer=m.text_layer, device=device)
    raise ValueError(f"build_t5_text_encoder: model.text_encoder is {m.text_encoder!r}, not 't5' or 't5+clip'")
