"""A tiny CLIP pretrained on the synthetic shapes: the toy preset's frozen text encoder E_theta.

RAPHAEL (Sec. 2, App. 7.1 Table 2) conditions on a frozen *pretrained* OpenCLIP-g/14 text tower. A
random tower cannot stand in for it at toy scale: the token features of one caption of a random
2-block tower are alike (mean pairwise cosine 0.69 over the caption's tokens, 0.86 over all 77
slots), and a toy U-Net barely learns to read them (docs/evaluation.md, erratum E67). So the toy gets what the paper has, a CLIP pretrained on its own domain, at the toy's
size: open_clip's own ``CLIP`` class and ``ClipLoss`` (symmetric InfoNCE, Radford et al. 2021),

    text tower  : open_clip TextTransformer of the ``tiny`` shape (width 32, 2 blocks, 2 heads, n_y 77)
    image tower : open_clip VisionTransformer, 24 x 24 px, patches of 4, width 64, 3 blocks
    loss        : ClipLoss()(f_I, f_T, logit_scale), f = normalized embeddings (dim 64)

trained on rendered synthetic scenes (``raphael_ref.data.synthetic``) with their captions. The
result is written as an open_clip local model directory (``open_clip_config.json`` +
``open_clip_model.safetensors``), so that

* ``TextEncoder.from_config("toy-clip")`` reads its text tower (the toy preset's E_theta, frozen),
* ``raphael_ref.evaluation.metrics.load_clip(TOY_CLIP_DIR)`` gives the toy CLIP score (Fig. 6b's
  x-axis at toy scale), and
* :func:`register_toy_clip_extractor` gives torch-fidelity a Frechet distance in its image-feature
  space (Fig. 6b's y-axis at toy scale, beside the pixel one).

The shipped weights (``raphael_ref/assets/toy_clip``) and the command that made them are recorded
in ``raphael_ref/assets/toy_clip/PROVENANCE.json``; ``tools/pretrain_clip.py`` reproduces them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "TOY_CLIP_DIR",
    "TOY_CLIP_EXTRACTOR",
    "ToyClipConfig",
    "binding_probe",
    "build_toy_clip",
    "cpu_fingerprint",
    "evaluate_retrieval",
    "image_embedding",
    "model_cfg",
    "pretrain_toy_clip",
    "register_toy_clip_extractor",
    "render_set",
    "same_float_build",
    "save_open_clip_dir",
    "sha256_file",
    "tensor_sha256",
    "token_cosine",
]

TOY_CLIP_DIR = Path(__file__).resolve().parent / "assets" / "toy_clip"
TOY_CLIP_EXTRACTOR = "raphael-toy-clip"
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
PROVENANCE_NAME = "PROVENANCE.json"


@dataclasses.dataclass
class ToyClipConfig:
    """Everything that determines the pretrained tower (recorded in PROVENANCE.json)."""

    seed: int = 0
    steps: int = 500
    batch_size: int = 256
    n_train: int = 16384  # distinct training scenes (data seed 1000 + seed), cycled in shuffled epochs
    n_eval: int = 1024  # held-out scenes (data seed 2000 + seed) for image -> caption retrieval
    image_size: int = 24
    max_objects: int = 3
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    embed_dim: int = 64
    # text tower: the toy preset's shape (raphael_ref.text_encoder.TINY); must stay in step with it
    text_width: int = 32
    text_heads: int = 2
    text_layers: int = 2
    # image tower: a small ViT
    vision_width: int = 64
    vision_layers: int = 3
    vision_head_width: int = 32
    patch_size: int = 4

    def validate(self) -> "ToyClipConfig":
        for name in ("steps", "batch_size", "n_train", "n_eval", "embed_dim", "text_width", "text_heads",
                     "text_layers", "vision_width", "vision_layers", "vision_head_width", "patch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ToyClipConfig.{name} must be a positive int, got {v!r}")
        if self.batch_size > self.n_train:
            raise ValueError(f"ToyClipConfig.batch_size ({self.batch_size}) exceeds n_train ({self.n_train})")
        if self.image_size % self.patch_size:
            raise ValueError(f"ToyClipConfig.image_size ({self.image_size}) must be a multiple of patch_size "
                             f"({self.patch_size})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"ToyClipConfig.lr must be a finite number > 0, got {self.lr!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"ToyClipConfig.weight_decay must be finite and >= 0, got {self.weight_decay!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"ToyClipConfig.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        return self


def model_cfg(cfg: ToyClipConfig) -> dict[str, Any]:
    """open_clip ``model_cfg`` (the dict of ``open_clip_config.json``) of the tiny CLIP."""
    return {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": False,
        "vision_cfg": {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "width": cfg.vision_width,
                       "layers": cfg.vision_layers, "head_width": cfg.vision_head_width, "mlp_ratio": 4.0},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": cfg.text_width, "heads": cfg.text_heads,
                     "layers": cfg.text_layers},
    }


# images reach the image tower as [0, 1] floats normalized with mean 0.5, std 0.5, i.e. in [-1, 1]:
# the range of the synthetic renders and of the U-Net's samples.
PREPROCESS_CFG = {"size": 24, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                  "resize_mode": "shortest"}


def build_toy_clip(cfg: ToyClipConfig):
    """open_clip ``CLIP`` of the tiny shape, random init from the global RNG (seed it first)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    mc = model_cfg(cfg)
    return CLIP(embed_dim=mc["embed_dim"], vision_cfg=CLIPVisionCfg(**mc["vision_cfg"]),
                text_cfg=CLIPTextCfg(**mc["text_cfg"]), quick_gelu=mc["quick_gelu"])


def render_set(data_seed: int, n: int, image_size: int, max_objects: int) -> tuple[torch.Tensor, list[str]]:
    """(uint8 (n, 3, S, S), captions) of synthetic items 0..n-1 of data seed ``data_seed``."""
    from raphael_ref.data.synthetic import SyntheticShapes, render

    ds = SyntheticShapes(seed=data_seed, image_size=image_size, length=n, max_objects=max_objects)
    images = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
    captions = []
    for i in range(n):
        scene = ds.scene(i)
        images[i] = render(scene)
        captions.append(scene.caption)
    return images, captions


def _to_model(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0  # == ((x / 255) - 0.5) / 0.5, PREPROCESS_CFG


def image_embedding(model, images_uint8: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """The toy CLIP's image embedding before normalization, float32 (N, d), of uint8 (N, 3, S, S) images at the
    tower's size: the features of the registered torch-fidelity extractor (FD in toy-CLIP features)."""
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
        raise ValueError(f"image_embedding: expected uint8 images (N, 3, S, S); got {images_uint8.dtype} "
                         f"{tuple(images_uint8.shape)}")
    with torch.no_grad():
        return torch.cat([model.encode_image(_to_model(images_uint8[i:i + batch])).float()
                          for i in range(0, images_uint8.shape[0], batch)])


def _tokenize(captions: list[str]) -> torch.Tensor:
    from raphael_ref.text_encoder import clip_tokenizer

    return clip_tokenizer()(captions, context_length=77)


@torch.no_grad()
def evaluate_retrieval(model, images_uint8: torch.Tensor, captions: list[str], batch: int = 512) -> dict[str, float]:
    """Held-out image -> caption and caption -> image top-1 among all distinct captions / images.

    Captions that occur several times (the same scene drawn twice) count as correct for every image
    that has that caption.
    """
    was_training = model.training
    model.eval()
    uniq = sorted(set(captions))
    index = {c: i for i, c in enumerate(uniq)}
    target = torch.tensor([index[c] for c in captions])
    img = torch.cat([F.normalize(model.encode_image(_to_model(images_uint8[i:i + batch])), dim=-1)
                     for i in range(0, len(captions), batch)])
    txt = torch.cat([F.normalize(model.encode_text(_tokenize(uniq[i:i + batch])), dim=-1)
                     for i in range(0, len(uniq), batch)])
    sim = img @ txt.T  # (N images, U captions)
    i2t = (sim.argmax(dim=1) == target).float().mean().item()
    # caption -> image: the best image for each caption must carry that caption
    best_img = sim.argmax(dim=0)  # (U,)
    t2i = (target[best_img] == torch.arange(len(uniq))).float().mean().item()
    model.train(was_training)
    return {"image_to_caption_top1": i2t, "caption_to_image_top1": t2i, "n_images": len(captions),
            "n_captions": len(uniq)}


@torch.no_grad()
def token_cosine(text_tower_forward: Callable[[torch.Tensor], torch.Tensor], captions: list[str]) -> float:
    """Mean cosine between the token features of distinct valid positions within each caption.

    ``text_tower_forward(ids) -> (B, n_y, d)``. Only SOT..EOT positions count (padding excluded).
    Measured on 256 synthetic captions: 0.69 for the random ``tiny`` tower, 0.43 for the shipped
    toy CLIP tower; lower is more distinct words.
    """
    ids = _tokenize(captions)
    h = F.normalize(text_tower_forward(ids), dim=-1)  # (B, n, d)
    eot = ids.argmax(dim=-1)
    vals = []
    for b in range(ids.shape[0]):
        v = h[b, : int(eot[b]) + 1]  # (L, d)
        c = v @ v.T
        L = v.shape[0]
        vals.append((c.sum() - c.diagonal().sum()) / (L * (L - 1)))
    return float(torch.stack(vals).mean())


def _two_object_captions(n: int, seed: int, image_size: int = 24):
    """``n`` captions "a C1 S1 <where P1> and a C2 S2 <where P2>" with distinct shapes, colours and cells (as the
    benchmark's position prompts). Returns ``(ids, labels, last_1, last_2, shape_1, shape_2, n_shapes,
    n_colours)``: the token ids (n, 77), the (S1, C1, S2, C2) class indices (n, 4), the token index of each
    phrase's last word (n,), of each phrase's shape word (n,; its last BPE token) and the number of shape and
    colour classes."""
    from raphael_ref.data.synthetic import COLORS, POSITIONS, SHAPES, _article, make_scene

    rng = np.random.default_rng(seed)
    colours = list(COLORS)
    captions, labels, first_phrases, shape_prefixes = [], [], [], ([], [])
    for _ in range(n):
        s1, s2 = (SHAPES[i] for i in rng.choice(len(SHAPES), 2, replace=False))
        c1, c2 = (colours[i] for i in rng.choice(len(colours), 2, replace=False))
        p1, p2 = (POSITIONS[i] for i in rng.choice(len(POSITIONS), 2, replace=False))
        captions.append(make_scene([(s1, c1, p1), (s2, c2, p2)], image_size).caption)
        first_phrases.append(make_scene([(s1, c1, p1)], image_size).caption)
        shape_prefixes[0].append(f"{_article(c1)} {c1} {s1}")
        shape_prefixes[1].append(f"{first_phrases[-1]} and {_article(c2)} {c2} {s2}")
        labels.append((SHAPES.index(s1), colours.index(c1), SHAPES.index(s2), colours.index(c2)))
    ids = _tokenize(captions)
    if not all(c.startswith(f + " and ") and c.startswith(a) and c.startswith(b)
               for c, f, a, b in zip(captions, first_phrases, *shape_prefixes)):
        raise RuntimeError("binding_probe: the caption template changed (the first object's phrase is no longer "
                           "a prefix of the two-object caption); update _two_object_captions")
    # token layout: SOT w_1 .. w_k EOT pad...; the last word of a text is the token before its EOT
    last_1 = (_tokenize(first_phrases) != 0).sum(dim=1) - 2
    last_2 = (ids != 0).sum(dim=1) - 2
    shape_1, shape_2 = ((_tokenize(pre) != 0).sum(dim=1) - 2 for pre in shape_prefixes)
    return ids, torch.tensor(labels), last_1, last_2, shape_1, shape_2, len(SHAPES), len(colours)


def _linear_probe_accuracy(x: torch.Tensor, y: torch.Tensor, n_classes: int, n_train: int) -> float:
    """Held-out accuracy of a multinomial logistic regression (L-BFGS, L2 1e-3) on standardized features."""
    mu, sd = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = (x - mu) / sd
    w = torch.zeros(x.shape[1], n_classes, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(n_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x[:n_train] @ w + b, y[:n_train]) + 1e-3 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((x[n_train:] @ w + b).argmax(dim=1) == y[n_train:]).double().mean())


def binding_probe(text_tower_forward: Callable[[torch.Tensor], torch.Tensor], n: int = 3000, seed: int = 0,
                  train_fraction: float = 2 / 3) -> dict[str, Any]:
    """What the U-Net can read at each object's words in a two-object caption (binding, measured).

    For ``n`` captions "a C1 S1 <where P1> and a C2 S2 <where P2>" (the benchmark's position prompts) a linear
    probe (multinomial logistic regression, fitted on the first ``train_fraction``, scored on the rest) reads
    S1, C1, S2 and C2 from the token feature at: ``word_1``, the last word of the first phrase (P1's word: with a
    causal tower the first token that knows where object 1 goes), ``word_2``, the last word of the second phrase
    (the first token that knows both what object 2 is and where it goes), ``shape_word_1`` / ``shape_word_2``,
    each phrase's shape word ("circle"; its last BPE token), and ``eot`` (the pooled token).

    A U-Net query at cell P2 that wants object 2 must find it at ``word_2``; whatever of object 1 that token also
    carries is what leaks into cell P2. Chance: shape 1/3, colour 1/6. At ``word_1`` a causal tower cannot know
    object 2 beyond "not object 1": shape 1/2, colour 1/5 (a check that the probe reads the right tokens).

    ``text_tower_forward(ids) -> (B, n_y, d)``. Returns ``{"word_1": {"shape_1": acc, ...}, "word_2": ...,
    "shape_word_1": ..., "shape_word_2": ..., "eot": ..., "chance": ..., "n_train": .., "n_test": ..}``.
    """
    n_train = int(round(n * train_fraction)) if 0 < train_fraction < 1 else 0
    if n < 30 or not 10 <= n_train <= n - 10:
        raise ValueError(f"binding_probe: need n >= 30 and a train_fraction that leaves >= 10 captions on each "
                         f"side; got n={n}, train_fraction={train_fraction} ({n_train} to fit)")
    ids, labels, last_1, last_2, shape_1, shape_2, n_shapes, n_colours = _two_object_captions(n, seed)
    with torch.no_grad():
        h = text_tower_forward(ids).double()  # (n, n_y, d)
    rows = torch.arange(n)
    eot = ids.argmax(dim=-1)
    out: dict[str, Any] = {}
    for where, index in (("word_1", last_1), ("word_2", last_2), ("shape_word_1", shape_1),
                         ("shape_word_2", shape_2), ("eot", eot)):
        x = h[rows, index]
        out[where] = {name: _linear_probe_accuracy(x, labels[:, k], classes, n_train)
                      for k, (name, classes) in enumerate((("shape_1", n_shapes), ("colour_1", n_colours),
                                                           ("shape_2", n_shapes), ("colour_2", n_colours)))}
    out["chance"] = {"shape": 1 / n_shapes, "colour": 1 / n_colours,
                     "shape_unseen": 1 / (n_shapes - 1), "colour_unseen": 1 / (n_colours - 1)}
    out["n_train"], out["n_test"] = n_train, n - n_train
    return out


def _lr_at(step: int, cfg: ToyClipConfig) -> float:
    """Linear warm-up then cosine decay to 0 (open_clip's default ``cosine`` schedule)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    e = step - cfg.warmup_steps
    es = max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * cfg.lr


def pretrain_toy_clip(cfg: ToyClipConfig, *, progress: bool = True, log: Callable[[str], None] = print):
    """Train the tiny CLIP; returns (model, metrics). Deterministic for a given seed, CPU kind and threads."""
    from open_clip.loss import ClipLoss

    cfg.validate()
    t0 = time.time()
    train_images, train_caps = render_set(1000 + cfg.seed, cfg.n_train, cfg.image_size, cfg.max_objects)
    eval_images, eval_caps = render_set(2000 + cfg.seed, cfg.n_eval, cfg.image_size, cfg.max_objects)
    train_ids = _tokenize(train_caps)  # (n_train, 77)
    log(f"rendered {cfg.n_train} training and {cfg.n_eval} held-out scenes in {time.time() - t0:.1f} s")

    torch.manual_seed(cfg.seed)
    model = build_toy_clip(cfg)
    model.train()
    # no weight decay on gains, biases, embeddings and the logit scale (open_clip's main.py rule)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in n or "logit_scale" in n else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(cfg.n_train, generator=gen)
    pos = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc="toy CLIP", unit="step")
    losses = []
    for step in range(cfg.steps):
        if pos + cfg.batch_size > cfg.n_train:
            order, pos = torch.randperm(cfg.n_train, generator=gen), 0
        idx = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        img_f, txt_f, scale = model(_to_model(train_images[idx]), train_ids[idx])
        loss = loss_fn(img_f, txt_f, scale)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"toy CLIP loss is {loss.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's clamp of the temperature
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    model.eval().requires_grad_(False)
    metrics = evaluate_retrieval(model, eval_images, eval_caps)
    metrics["final_loss_mean_last_20"] = float(np.mean(losses[-20:]))
    metrics["train_seconds"] = round(time.time() - t0, 1)
    return model, metrics


# CPU features that decide which float kernels torch, oneDNN and MKL pick (and so their last bits)
_KERNEL_ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                     "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


def cpu_fingerprint() -> dict[str, Any]:
    """What identifies this CPU for bit-for-bit reproduction of float results.

    torch's CPU capability (AVX512, AVX2, ...) is not enough: two CPUs of one capability can differ in
    the extensions oneDNN and MKL dispatch on (AMX, AVX512-BF16, VNNI) and in the cache sizes their
    blocking follows, and then the same command gives weights that differ in their last bits. Measured:
    the shipped toy tower, retrained by its provenance command in a later session (the same torch,
    capability AVX512 and 1 thread; the VM's CPU is not recorded, so which of these changed is not
    known), ends with every tensor different, twice alike, and the same retrieval accuracy to 0.001.
    Read from /proc/cpuinfo and /sys on Linux; elsewhere only ``platform.processor()``.
    """
    import platform

    fp: dict[str, Any] = {"processor": platform.processor(), "isa": [], "cpuid": None, "caches": []}
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return fp
    fields = {}
    for line in info.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    fp["processor"] = fields.get("model name", fp["processor"])
    fp["cpuid"] = "/".join(fields.get(k, "?") for k in ("vendor_id", "cpu family", "model", "stepping"))
    flags = set(fields.get("flags", "").split())
    fp["isa"] = [f for f in _KERNEL_ISA_FLAGS if f in flags]
    caches = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"))
    for c in caches:
        try:
            fp["caches"].append(f"L{(c / 'level').read_text().strip()} {(c / 'type').read_text().strip()} "
                                f"{(c / 'size').read_text().strip()}")
        except OSError:
            pass
    return fp


def same_float_build(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two PROVENANCE records come from builds and CPUs whose float results may be compared bit for
    bit: the same torch, CPU capability, thread count and ``cpu`` fingerprint (``cpu_fingerprint``). A
    record without a fingerprint (the shipped tower's was written before it existed), or with one that could
    not read the CPU's id (no /proc/cpuinfo: only ``platform.processor()``, e.g. "arm"), never matches."""
    keys = ("torch", "cpu_capability", "threads", "cpu")
    return all(k in a and k in b for k in keys) and all(a[k] == b[k] for k in keys) and bool(a["cpu"].get("cpuid"))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_sha256(path: str | Path) -> str:
    """SHA-256 of a safetensors file's tensors (sorted names, dtype, shape, bytes), not of the file:
    safetensors writes its header metadata in a per-process key order, so equal tensors can give files
    with different bytes."""
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous().reshape(-1)  # 0-d tensors (logit_scale) as (1,)
            h.update(f"{name}|{t.dtype}|{tuple(f.get_slice(name).get_shape())}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_open_clip_dir(model, cfg: ToyClipConfig, directory: str | Path) -> Path:
    """Write an open_clip local model directory (config + safetensors) that ``load_clip`` and
    ``TextEncoder.from_config`` read."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pp = dict(PREPROCESS_CFG, size=cfg.image_size)
    (directory / CONFIG_NAME).write_text(json.dumps({"model_cfg": model_cfg(cfg), "preprocess_cfg": pp},
                                                    indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "producer": "raphael_ref.toy_clip"})
    return directory


def load_toy_clip(directory: str | Path = TOY_CLIP_DIR, device: str | torch.device = "cpu"):
    """The pretrained tiny CLIP (open_clip ``CLIP``, eval mode, frozen) from ``directory``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_file, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"toy CLIP file {f} is missing; rebuild it with `python tools/pretrain_clip.py "
                                    f"--out {directory}` (see {directory / PROVENANCE_NAME})")
    mc = json.loads(cfg_file.read_text())["model_cfg"]
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(embed_dim=mc["embed_dim"], vision_cfg=CLIPVisionCfg(**mc["vision_cfg"]),
                 text_cfg=CLIPTextCfg(**mc["text_cfg"]), quick_gelu=mc.get("quick_gelu", False))
    model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# torch-fidelity feature extractor: the toy CLIP's image embedding
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class ToyClipFeatureExtractor(FeatureExtractorBase):
        """Image features of the pretrained toy CLIP (the toy's stand-in for Inception-v3).

        Input: uint8 (B, 3, S, S) as torch-fidelity passes it, S = the tower's image size (24).
        Features: ``"embed"``, the image embedding before normalization (B, 64); ``"pool"``, the
        ViT's pooled token before the projection (B, 64).
        """

        FEATURES = ("embed",)

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.clip = load_toy_clip(kwargs.get("feature_extractor_weights_path") or TOY_CLIP_DIR)
            self.image_size = int(self.clip.visual.image_size[0] if isinstance(self.clip.visual.image_size, tuple)
                                  else self.clip.visual.image_size)

        @staticmethod
        def get_provided_features_list():
            return ToyClipFeatureExtractor.FEATURES

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "embed"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 24, 24, dtype=torch.uint8)

        def forward(self, x):
            if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
                raise ValueError(f"expected uint8 images (B, 3, H, W); got {x.dtype} {tuple(x.shape)}")
            if x.shape[-2:] != (self.image_size, self.image_size):
                # the toy renders are S x S: area-resample other sizes to the tower's
                x = F.interpolate(x.float(), size=(self.image_size,) * 2, mode="area").round().clamp(0, 255)
            return (image_embedding(self.clip, x.to(torch.uint8)),)  # (no_grad inside)

    return ToyClipFeatureExtractor


def register_toy_clip_extractor(name: str = TOY_CLIP_EXTRACTOR) -> str:
    """Register the toy CLIP image tower with torch-fidelity (idempotent); returns its name."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    cls = _extractor_class()
    if name in FEATURE_EXTRACTORS_REGISTRY:
        if FEATURE_EXTRACTORS_REGISTRY[name] is not cls:
            raise ValueError(f"a different feature extractor is already registered as {name!r}")
        return name
    register_feature_extractor(name, cls)
    return name
