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
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from raphael_ref.text_encoder import PromptTruncatedWarning, TextEncoding, prompt_list

__all__ = ["T5TextEncoder", "write_tiny_t5"]


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
