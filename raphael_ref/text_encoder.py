"""Frozen OpenCLIP text encoder E_theta(y): prompts -> text tokens (B, n_y, d_y).

RAPHAEL Sec. 2 feeds the text tokens E_theta(y) (n_y x d_y) into every cross-attention layer;
App. 7.1 Table 2 fixes the encoder to OpenCLIP-g/14 with n_y = 77 and d_y = 1024. This module
wraps open_clip's causal text transformer *without* its vision tower and without the final text
projection (errata E38 of ``spec/errata.md``):

    ids    = [SOT, bpe(prompt)[:n_y - 2], EOT, 0, ..., 0]                 # (B, n_y) long
    hidden = ln_final(block_k(... block_1(tok_emb[ids] + pos_emb)))       # (B, n_y, d_y)

with k = all blocks (``layer="last"``, default) or all but the last (``layer="penultimate"``,
the Stable Diffusion 2 convention). The pooled token is the end-of-text token, found as the argmax
of the ids as in CLIP (E39); the valid mask marks the positions up to and including it (E40).

Weights never download: ``TextEncoder.from_config("ViT-g-14", weights=<local file>)`` reads the
text-tower keys of a full open_clip CLIP checkpoint (safetensors, or .bin/.pt through
``torch.load(weights_only=True)``), or a file written by :meth:`TextEncoder.save`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from raphael_ref.statedict import state_dict_mismatches

__all__ = [
    "PromptTruncatedWarning",
    "TextEncoder",
    "TextEncoderConfig",
    "TextEncoding",
    "clip_tokenizer",
    "text_tower_state_dict",
]

LAYERS = ("last", "penultimate")
CLIP_VOCAB_SIZE = 49408  # 256 bytes x 2 (word-final or not) + 48894 merges + SOT + EOT
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_FORMAT = "raphael_ref.text_encoder"


def prompt_list(prompts: str | Sequence[str]) -> list[str]:
    """``prompts`` as a non-empty list of str (one str: a list of one); ValueError otherwise."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a str or a sequence of str, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass at least one prompt (use '' for the unconditional one)")
    return list(prompts)


class PromptTruncatedWarning(UserWarning):
    """A prompt had more BPE tokens than fit in the context; the tail was dropped."""


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """open_clip's CLIP BPE tokenizer (the vocabulary ships inside the package: works offline)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """Shape of a causal CLIP text tower (open_clip ``text_cfg`` subset) and the layer we read.

    vocab_size is fixed by the CLIP BPE tokenizer (49408: 49406 BPE entries + SOT + EOT);
    context_length is n_y (77 in CLIP and in RAPHAEL Table 2). ``quick_gelu`` is True only for
    OpenAI-trained towers (open_clip's ``-quickgelu`` configs); the LAION ViT-g-14 uses GELU.
    """

    width: int
    heads: int
    layers: int
    context_length: int = 77
    vocab_size: int = 49408
    mlp_ratio: float = 4.0
    ls_init_value: float | None = None
    quick_gelu: bool = False
    layer: str = "last"
    name: str = ""
    # Random init only (no weights file): open_clip's token embedding (std 0.02) is multiplied by this.
    # The toy tower "tiny-distinct" uses 50 (std 1): a random 2-block tower with std-0.02 embeddings
    # gives tokens of one caption near-identical features (cosine ~0.98), which a toy U-Net barely
    # learns to read; with std 1 distinct words stay distinct (cosine ~0.1-0.3). Ignored when loading.
    token_embed_scale: float = 1.0

    def __post_init__(self) -> None:
        for field in ("width", "heads", "layers"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TextEncoderConfig.{field} must be a positive int, got {value!r}")
        if self.width % self.heads:
            raise ValueError(
                f"TextEncoderConfig: width ({self.width}) must be divisible by heads ({self.heads})"
            )
        if self.context_length < 3:
            raise ValueError(
                f"TextEncoderConfig.context_length must be >= 3 (SOT, one token, EOT), "
                f"got {self.context_length}"
            )
        if self.vocab_size != CLIP_VOCAB_SIZE:
            raise ValueError(
                f"TextEncoderConfig.vocab_size must equal the CLIP BPE vocabulary size "
                f"{CLIP_VOCAB_SIZE} (the tokenizer emits ids up to {CLIP_VOCAB_SIZE - 1}), "
                f"got {self.vocab_size}"
            )
        if self.layer not in LAYERS:
            raise ValueError(f"TextEncoderConfig.layer must be one of {LAYERS}, got {self.layer!r}")
        if self.layer == "penultimate" and self.layers < 2:
            raise ValueError(
                f"layer='penultimate' needs a tower with >= 2 blocks, this one has {self.layers}; "
                f"use layer='last'"
            )

    @property
    def d_y(self) -> int:
        return self.width

    def to_json(self) -> dict[str, Any]:
        return {"format": _FORMAT, "version": 1, **dataclasses.asdict(self)}


TINY = TextEncoderConfig(width=32, heads=2, layers=2, name="tiny")
"""Random-init tower for tests and the toy preset: real tokenizer, ~1.6M parameters."""

TINY_DISTINCT = dataclasses.replace(TINY, name="tiny-distinct", token_embed_scale=50.0)
"""TINY with token embeddings of std 1 (``token_embed_scale``), an option for toy runs
(``model.text_encoder=tiny-distinct``): words of one caption keep distinct features. Measured at
500 toy steps it did not make the U-Net read the text sooner (docs/evaluation.md)."""

RANDOM_BY_DESIGN = (TINY.name, TINY_DISTINCT.name)

TOY_CLIP = "toy-clip"
"""The TINY shape pretrained contrastively on the synthetic shapes (raphael_ref/toy_clip.py), shipped
with the package: the toy preset's frozen E_theta. ``from_config("toy-clip")`` loads it."""  # random towers that need no weights (no warning)

# Options of open_clip's CLIPTextCfg that touch only what we drop (the final projection and its
# pooling) or that we re-derive; anything else must keep open_clip's default value.
_IGNORED_TEXT_CFG = {"proj_type", "proj_bias", "output_tokens", "pad_id", "eos_id", "pool_type"}


def _config_from_open_clip(model_cfg: Mapping[str, Any], name: str = "") -> TextEncoderConfig:
    """Our config from an open_clip model config (``{"text_cfg": ..., "quick_gelu": ...}``)."""
    from open_clip.model import CLIPTextCfg

    text_cfg = dict(model_cfg["text_cfg"])
    defaults = dataclasses.asdict(CLIPTextCfg())
    supported = {"width", "heads", "layers", "context_length", "vocab_size", "mlp_ratio", "ls_init_value"}
    bad = {}
    for key, value in text_cfg.items():
        if key in supported or key in _IGNORED_TEXT_CFG:
            continue
        if key not in defaults or value != defaults[key]:
            bad[key] = value
    if text_cfg.get("pool_type", "argmax") != "argmax":
        bad["pool_type"] = text_cfg["pool_type"]
    if bad:
        raise ValueError(
            f"open_clip text_cfg of {name or 'the given config'} uses options this wrapper does not "
            f"support: {bad}. TextEncoder supports the standard causal CLIP text tower (CLIP BPE "
            f"tokenizer, argmax/EOT pooling); pick such a config (e.g. 'ViT-g-14', 'ViT-H-14')."
        )
    kwargs = {k: text_cfg[k] for k in supported if k in text_cfg}
    return TextEncoderConfig(**kwargs, quick_gelu=bool(model_cfg.get("quick_gelu", False)), name=name)


def _resolve_config(name_or_cfg: Any) -> TextEncoderConfig:
    """Accepts a TextEncoderConfig, 'tiny', an open_clip model name, a JSON path, or a dict."""
    if isinstance(name_or_cfg, TextEncoderConfig):
        return name_or_cfg
    if isinstance(name_or_cfg, Mapping):
        cfg = dict(name_or_cfg)
        cfg = cfg.get("model_cfg", cfg)  # open_clip_config.json nests the model config
        if "text_cfg" in cfg:
            return _config_from_open_clip(cfg, name=str(cfg.get("name", "")))
        if cfg.get("format", _FORMAT) != _FORMAT:
            raise ValueError(f"unknown text encoder config format {cfg['format']!r}; expected {_FORMAT!r}")
        cfg = {k: v for k, v in cfg.items() if k not in ("format", "version")}
        fields = {f.name for f in dataclasses.fields(TextEncoderConfig)}
        unknown = sorted(set(cfg) - fields)
        if unknown:
            raise ValueError(f"unknown TextEncoderConfig keys {unknown}; known keys: {sorted(fields)}")
        return TextEncoderConfig(**cfg)
    if isinstance(name_or_cfg, (str, Path)):
        text = str(name_or_cfg)
        if text == "tiny":
            return TINY
        if text == "tiny-distinct":
            return TINY_DISTINCT
        if text == TOY_CLIP:
            from raphael_ref.toy_clip import CONFIG_NAME, TOY_CLIP_DIR

            model_cfg = json.loads((TOY_CLIP_DIR / CONFIG_NAME).read_text())["model_cfg"]
            return _config_from_open_clip(model_cfg, name=TOY_CLIP)
        path = Path(text)
        if path.suffix == ".json" or path.is_dir():
            if path.is_dir():
                path = path / CONFIG_FILE
            if not path.is_file():
                raise FileNotFoundError(
                    f"text encoder config {path} does not exist; pass an existing JSON file (as "
                    f"written by TextEncoder.save or open_clip's model_configs/*.json) or a model name"
                )
            cfg = json.loads(path.read_text())
            if "text_cfg" in cfg.get("model_cfg", cfg) and not cfg.get("name"):
                cfg = {**cfg.get("model_cfg", cfg), "name": path.stem}
            return _resolve_config(cfg)
        if text.startswith(("hf-hub:", "local-dir:")):
            raise ValueError(
                f"{text!r}: hub and local-dir references are not resolved here (nothing is "
                f"downloaded); pass the model name (e.g. 'ViT-g-14') or a local JSON config file"
            )
        import open_clip

        model_cfg = open_clip.get_model_config(text)
        if model_cfg is None:
            raise ValueError(
                f"unknown text encoder {text!r}: not 'tiny', not a .json file and not an open_clip "
                f"model config name (see open_clip.list_models(), e.g. 'ViT-g-14')"
            )
        return _config_from_open_clip(model_cfg, name=text)
    raise ValueError(
        f"name_or_cfg must be a TextEncoderConfig, a dict, a model name or a JSON path, "
        f"got {type(name_or_cfg).__name__}"
    )


class LayerNormFloat32(nn.LayerNorm):
    """LayerNorm evaluated in float32 (input and parameters), result cast back to the input dtype.

    Keeps the project convention "norms in float32 under bf16/fp16" even when the whole tower is
    cast with ``.to(torch.bfloat16)``; identical to ``nn.LayerNorm`` in float32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        y = nn.functional.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return y.to(x.dtype)


def _build_tower(cfg: TextEncoderConfig) -> nn.Module:
    """open_clip's TextTransformer for ``cfg``, with no final text projection (E38)."""
    from open_clip.transformer import QuickGELU, TextTransformer

    return TextTransformer(
        context_length=cfg.context_length,
        vocab_size=cfg.vocab_size,
        width=cfg.width,
        heads=cfg.heads,
        layers=cfg.layers,
        mlp_ratio=cfg.mlp_ratio,
        ls_init_value=cfg.ls_init_value,
        output_dim=None,
        proj_type="none",
        pool_type="argmax",
        act_layer=QuickGELU if cfg.quick_gelu else nn.GELU,
        norm_layer=LayerNormFloat32,
    )


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------

_CHECKPOINT_NAMES = (WEIGHTS_FILE, "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_NON_TEXT_TOP_LEVEL = ("logit_scale", "logit_bias", "text_projection", "attn_mask")


def _checkpoint_file(path: Path) -> Path:
    if path.is_dir():
        found = [path / n for n in _CHECKPOINT_NAMES if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(
                f"no text encoder weights in directory {path}: expected one of {list(_CHECKPOINT_NAMES)}"
            )
        return found[0]
    return path


def _text_key_map(keys: Sequence[str]) -> dict[str, str]:
    """{text-tower key: checkpoint key} for the keys of a full open_clip CLIP checkpoint."""
    names = {k: k for k in keys}
    if names and all(k.startswith("module.") for k in names):  # saved from DistributedDataParallel
        names = {k[len("module."):]: v for k, v in names.items()}
    if "text.token_embedding.weight" in names:  # CustomTextCLIP keeps the tower under "text."
        names = {k[len("text."):]: v for k, v in names.items() if k.startswith("text.")}
    return {
        k: v for k, v in names.items()
        if not k.startswith("visual.") and k.split(".")[0] not in _NON_TEXT_TOP_LEVEL
    }


def text_tower_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text-tower tensors of a full open_clip CLIP state dict, keyed as open_clip's TextTransformer.

    Strips a DDP ``module.`` prefix and a CustomTextCLIP ``text.`` prefix; drops the vision tower
    (``visual.*``), ``logit_scale``/``logit_bias``, the final ``text_projection`` (unused, E38) and
    legacy ``attn_mask`` buffers. What remains must match the tower exactly (checked on load).
    """
    return {new: state_dict[old] for new, old in _text_key_map(list(state_dict)).items()}


def _read_text_tower(path: Path) -> dict[str, torch.Tensor]:
    """Text-tower tensors of a local checkpoint (safetensors, or a torch zip read weights_only).

    Only the text keys are read from safetensors files and torch zips are memory-mapped, so the
    vision tower of a full CLIP checkpoint never lands in memory.
    """
    path = _checkpoint_file(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {new: f.get_tensor(old) for new, old in _text_key_map(list(f.keys())).items()}
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]  # open_clip training checkpoints wrap the weights
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
        return text_tower_state_dict(obj)
    raise ValueError(
        f"unsupported weights file {path.name!r}: expected .safetensors, or .bin/.pt/.pth/.ckpt "
        f"(read with torch.load(weights_only=True))"
    )


def _check_keys(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], source: Path) -> None:
    missing, unexpected, mismatched = state_dict_mismatches({k: v.shape for k, v in expected.items()}, given)
    wrong = [f"{k}: expected {e}, file has {g}" for k, e, g in mismatched]
    if not (missing or unexpected or wrong):
        return

    def head(items: list[str]) -> str:
        return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")

    lines = [f"weights in {source} do not match the text tower of this config:"]
    if missing:
        lines.append(f"  missing keys: {head(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {head(unexpected)}")
    if wrong:
        lines.append(f"  wrong shapes: {head(wrong)}")
    lines.append("Check that the config (width/heads/layers/context_length) matches the weights.")
    raise ValueError("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextEncoding:
    """Output of :class:`TextEncoder`: the text tokens y and their bookkeeping.

    hidden:       (B, n_y, d_y) token states E_theta(y), all n_y positions (padding included).
    pooled_index: (B,) long, position of the end-of-text token (= argmax of ids, E39).
    valid:        (B, n_y) bool, True at positions 0..pooled_index (SOT, prompt tokens, EOT; E40).
    pooled:       (B, d_y) hidden state at pooled_index (before any projection).
    ids:          (B, n_y) long token ids that were encoded.
    """

    hidden: torch.Tensor
    pooled_index: torch.Tensor
    valid: torch.Tensor
    pooled: torch.Tensor
    ids: torch.Tensor

    def trimmed(self) -> "TextEncoding":
        """The same encoding cut to its first L = max_b(pooled_index_b) + 1 positions: every valid token of every
        row (SOT, the prompt, EOT), and the padding slots that follow some row's EOT inside that span.

        For a U-Net that neither attends to nor counts padding (``model.attend_padding = model.count_padding =
        False``) the cut slots change nothing but the cost: their keys get zero attention, their space-MoE terms are
        not summed, and no pooled index points at them (tests/test_models.py). A short caption's step then works on
        ~10-25 text tokens instead of 77. Reads ``pooled_index`` on the host (one sync on an accelerator).
        """
        L = int(self.pooled_index.max()) + 1 if self.pooled_index.numel() else self.hidden.shape[1]
        if L >= self.hidden.shape[1]:
            return self
        return dataclasses.replace(self, hidden=self.hidden[:, :L], valid=self.valid[:, :L], ids=self.ids[:, :L])


class TextEncoder(nn.Module):
    """Frozen OpenCLIP text tower E_theta (RAPHAEL Sec. 2; Table 2: OpenCLIP-g/14, n_y 77, d_y 1024).

    Build with :meth:`from_config` (local weights) or :meth:`tiny` (random, for tests). Calling
    the module on prompts or ids returns a :class:`TextEncoding`; it never builds a graph.
    """

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        if not isinstance(config, TextEncoderConfig):
            raise ValueError(f"config must be a TextEncoderConfig, got {type(config).__name__}; "
                             f"use TextEncoder.from_config(...) for names, dicts and JSON files")
        self.config = config
        self.tower = _build_tower(config)
        self._freeze()

    # --- construction --------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        name_or_cfg: Any,
        weights: str | Path | None = None,
        *,
        layer: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        seed: int | None = None,
    ) -> "TextEncoder":
        """Build the text tower of ``name_or_cfg`` and load ``weights`` from a local file.

        name_or_cfg: an open_clip model name (``"ViT-g-14"``, read from open_clip's bundled
            ``model_configs``), ``"tiny"``, a JSON file (ours or open_clip's), a dict, or a
            :class:`TextEncoderConfig`.
        weights: local ``.safetensors`` / ``.bin`` / ``.pt`` file of the full CLIP or of the text
            tower, or a directory holding one. ``None`` gives random weights: a warning says so,
            except for ``"tiny"`` (random by design) and on the meta device, which allocates
            nothing (for shape/parameter checks).
        layer: ``"last"`` or ``"penultimate"``; overrides the config's choice.
        dtype: parameter dtype (default float32, whatever the file stores).
        seed: seeds the random init (``weights=None``) without touching the global RNG.
        """
        cfg = _resolve_config(name_or_cfg)
        if weights is None and cfg.name == TOY_CLIP:
            from raphael_ref.toy_clip import TOY_CLIP_DIR

            weights = TOY_CLIP_DIR  # the shipped pretrained toy tower (raphael_ref/assets/toy_clip)
        if layer is not None:
            cfg = dataclasses.replace(cfg, layer=layer)
        device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = dtype or torch.float32
        if weights is None:
            if device.type != "meta" and cfg.name not in RANDOM_BY_DESIGN:
                warnings.warn(
                    f"TextEncoder {cfg.name or cfg}: no weights given, using RANDOM weights. Pass "
                    f"weights=<local checkpoint file> for a pretrained text encoder.",
                    stacklevel=2,
                )
            with torch.random.fork_rng(devices=[]), torch.device(device):
                if seed is not None:
                    torch.manual_seed(seed)
                enc = cls(cfg)
                if cfg.token_embed_scale != 1.0:
                    with torch.no_grad():
                        enc.tower.token_embedding.weight.mul_(cfg.token_embed_scale)
            return enc.to(dtype=dtype)
        if device.type == "meta":
            raise ValueError("weights cannot be loaded onto the meta device; pass device='cpu' or 'cuda'")
        path = Path(weights)
        if not path.exists():
            raise FileNotFoundError(
                f"text encoder weights {path} not found. Provide a local file: the open_clip "
                f"checkpoint of {cfg.name or 'this model'} (e.g. open_clip_pytorch_model.bin or "
                f"open_clip_model.safetensors from its release), or a {WEIGHTS_FILE} written by "
                f"TextEncoder.save. Nothing is downloaded."
            )
        path = _checkpoint_file(path)
        state = _read_text_tower(path)
        with torch.device("meta"):  # no memory until the file's tensors are assigned
            enc = cls(cfg)
        _check_keys(enc.tower.state_dict(), state, path)
        enc.tower.load_state_dict(state, strict=True, assign=True)
        enc.tower.attn_mask = enc.tower.build_causal_mask()  # non-persistent buffer, rebuilt on CPU
        enc = enc.to(device=device, dtype=dtype)
        enc._freeze()
        return enc

    @classmethod
    def tiny(cls, seed: int = 0, *, layer: str = "last") -> "TextEncoder":
        """Random-init tiny tower (width 32, 2 blocks, 2 heads; real tokenizer) for tests and toy runs."""
        return cls.from_config(TINY, layer=layer, seed=seed)

    @classmethod
    def load(cls, directory: str | Path, **kwargs: Any) -> "TextEncoder":
        """Load a directory written by :meth:`save` (same code path as real weights)."""
        directory = Path(directory)
        return cls.from_config(directory / CONFIG_FILE, weights=directory / WEIGHTS_FILE, **kwargs)

    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (open_clip text-tower key names)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(self.config.to_json(), indent=2) + "\n")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tower.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": _FORMAT})
        return directory

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "TextEncoder":
        """Frozen: stays in eval mode whatever ``mode`` a parent module asks for."""
        return super().train(False)

    # --- properties ----------------------------------------------------------------------

    @property
    def d_y(self) -> int:
        return self.config.width

    @property
    def n_y(self) -> int:
        return self.config.context_length

    @property
    def layer(self) -> str:
        return self.config.layer

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- tokenization --------------------------------------------------------------------

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """CLIP BPE ids (B, n_y) long: [SOT, tokens, EOT, 0-padding]; long prompts truncated (E41).

        A prompt with more than n_y - 2 BPE tokens keeps its first n_y - 2 tokens (EOT stays
        last) and raises a :class:`PromptTruncatedWarning` naming the prompt and the drop count.
        """
        prompts = prompt_list(prompts)
        tok = clip_tokenizer()
        room = self.n_y - 2  # SOT and EOT take two positions
        ids = torch.zeros(len(prompts), self.n_y, dtype=torch.long)  # (B, n_y)
        for b, prompt in enumerate(prompts):
            bpe = tok.encode(prompt)
            if len(bpe) > room:
                shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                warnings.warn(
                    PromptTruncatedWarning(
                        f"prompt {b} ({shown!r}) has {len(bpe)} BPE tokens but only {room} fit in "
                        f"the context of {self.n_y}; dropped the last {len(bpe) - room} tokens"
                    ),
                    stacklevel=2,
                )
                bpe = bpe[:room]
            row = [tok.sot_token_id, *bpe, tok.eot_token_id]
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.dtype not in (torch.long, torch.int32):
            raise ValueError(f"ids must be an integer tensor (torch.long), got {ids.dtype}")
        if ids.dim() != 2 or ids.shape[1] != self.n_y:
            raise ValueError(f"ids must have shape (B, {self.n_y}), got {tuple(ids.shape)}; use .tokenize(prompts)")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.config.vocab_size}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        eot = clip_tokenizer().eot_token_id
        if not bool((ids == eot).any(dim=1).all()):
            raise ValueError(f"every row of ids must contain the end-of-text id {eot} (the pooled "
                             f"token); build ids with .tokenize(prompts)")

    # --- encoding ------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, prompts_or_ids: str | Sequence[str] | torch.Tensor) -> TextEncoding:
        """Encode prompts (or ids from :meth:`tokenize`) into text tokens y (B, n_y, d_y)."""
        if isinstance(prompts_or_ids, torch.Tensor):
            ids = prompts_or_ids
            self._check_ids(ids)
        else:
            ids = self.tokenize(prompts_or_ids)
        device = self.tower.token_embedding.weight.device
        ids = ids.to(device=device, dtype=torch.long)  # (B, n_y)
        batch = ids.shape[0]

        pooled_index = ids.argmax(dim=-1)  # (B,) EOT has the largest id in the CLIP vocabulary
        positions = torch.arange(self.n_y, device=device)  # (n_y,)
        valid = positions[None, :] <= pooled_index[:, None]  # (B, n_y)

        last_block = self.config.layers - (1 if self.layer == "last" else 2)
        out = self.tower.forward_intermediates(
            ids, indices=[last_block], stop_early=True, normalize_intermediates=True,
            intermediates_only=True, output_fmt="NLC",
        )
        hidden = out["text_intermediates"][0]  # (B, n_y, d_y), after ln_final
        pooled = hidden[torch.arange(batch, device=device), pooled_index]  # (B, d_y)
        return TextEncoding(hidden=hidden, pooled_index=pooled_index, valid=valid, pooled=pooled, ids=ids)

    def extra_repr(self) -> str:
        return f"name={self.config.name!r}, d_y={self.d_y}, n_y={self.n_y}, layer={self.layer!r}"


# words that open a new object phrase after the separator ("... and a blue square", "... and two red circles")
PHRASE_OPENERS: tuple[str, ...] = ("a", "an", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def encode_phrases_apart(encoder: "TextEncoder", prompts: str | Sequence[str], sep: str = " and ",
                         openers: Sequence[str] = PHRASE_OPENERS) -> TextEncoding:
    """A diagnostic departure from E_theta (not in RAPHAEL; erratum E85, docs/results/toy_phrases_apart.md): each
    prompt encoded whole, then the token states of every object phrase after the first replaced by those of the
    phrase encoded on its own.

    The prompt is split at ``sep``; a part opens a new object phrase when its first word is one of ``openers``
    ("a blue square at the top"), otherwise it stays with the phrase before it (the second place of "two red circles
    on the left and at the bottom"). In a causal tower the first phrase's states are the same either way; a later
    phrase's states then no longer see the earlier phrases (in "a red circle on the left and a blue square at the
    top", "square" stops carrying the circle). The separators' own tokens, SOT, EOT (the pooled token) and the ids
    stay the whole prompt's. A prompt with one object phrase is encoded as usual. Raises if a phrase's tokens are not
    those of the whole prompt at its place or the prompt would be truncated."""
    prompts = prompt_list(prompts)
    if not sep.strip():
        raise ValueError(f"sep must contain a word, got {sep!r}")
    tok = clip_tokenizer()
    for b, prompt in enumerate(prompts):
        if sep in prompt and len(tok.encode(prompt)) > encoder.n_y - 2:
            raise ValueError(f"prompt {b} would be truncated at {encoder.n_y - 2} tokens: its phrases cannot be "
                             f"placed; shorten it")
    full = encoder(prompts)
    n_sep = len(tok.encode(sep.strip()))
    places: list[tuple[int, int, int, int, str]] = []  # (prompt b, phrase k, start token, n tokens, phrase)
    for b, prompt in enumerate(prompts):
        phrases: list[str] = []
        for part in prompt.split(sep):
            words = part.split()
            if phrases and not (words and words[0].lower() in openers):
                phrases[-1] = phrases[-1] + sep + part  # not a new object: it stays with the phrase before it
            else:
                phrases.append(part)
        start = 1 + len(tok.encode(phrases[0]))  # SOT, then the first phrase
        for k, phrase in enumerate(phrases[1:], start=1):
            start += n_sep
            n = len(tok.encode(phrase))
            places.append((b, k, start, n, phrase))
            start += n
    if not places:
        return full
    unique = list(dict.fromkeys(p[4] for p in places))
    alone = encoder(unique)  # every later phrase of the batch, once, in one call
    row = {phrase: i for i, phrase in enumerate(unique)}
    hidden = full.hidden.clone()
    for b, k, start, n, phrase in places:
        i = row[phrase]
        if not torch.equal(alone.ids[i, 1:1 + n].cpu(), full.ids[b, start:start + n].cpu()):
            raise ValueError(f"prompt {b}: phrase {k} {phrase!r} does not tokenize the same alone as in the prompt")
        hidden[b, start:start + n] = alone.hidden[i, 1:1 + n]
    return dataclasses.replace(full, hidden=hidden)  # the pooled (EOT) state is the whole prompt's


class PhrasesApartEncoder(nn.Module):
    """A CLIP :class:`TextEncoder` whose prompts are encoded by :func:`encode_phrases_apart` (``model.
    text_phrases_apart``, E85): the same tower, tokenizer and token layout; only the later object phrases' states
    differ. It takes prompts, not ids (the phrases are found in the text)."""

    def __init__(self, encoder: TextEncoder):
        super().__init__()
        if not isinstance(encoder, TextEncoder):
            raise ValueError(f"PhrasesApartEncoder wraps a CLIP TextEncoder, got {type(encoder).__name__}")
        self.encoder = encoder

    n_y = property(lambda self: self.encoder.n_y)
    d_y = property(lambda self: self.encoder.d_y)
    config = property(lambda self: self.encoder.config)
    layer = property(lambda self: self.encoder.layer)

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        return self.encoder.tokenize(prompts)

    @torch.no_grad()
    def forward(self, prompts: str | Sequence[str]) -> TextEncoding:
        if isinstance(prompts, torch.Tensor):
            raise ValueError("model.text_phrases_apart: the encoder needs the prompts as text (it splits them into "
                             "object phrases), not token ids")
        return encode_phrases_apart(self.encoder, prompts)

    def extra_repr(self) -> str:
        return "later object phrases encoded apart (E85)"
