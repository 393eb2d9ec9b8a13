#!/usr/bin/env python
"""Pretrain the toy CLIP (open_clip ``CLIP`` + ``ClipLoss``) on the synthetic shapes.

    python tools/pretrain_clip.py                       # writes raphael_ref/assets/toy_clip (the shipped tower)
    python tools/pretrain_clip.py --out /tmp/clip --steps 50 --n-train 2048

The text tower has the toy preset's shape; the result is the toy preset's frozen E_theta
(``model.text_encoder = "toy-clip"``), its toy CLIP score and its Frechet-distance features
(raphael_ref/toy_clip.py). Writes ``open_clip_config.json``, ``open_clip_model.safetensors`` and
``PROVENANCE.json`` (this command, the seed, the settings, the metrics, the SHA-256 of the weights,
the torch version, CPU capability, CPU fingerprint and thread count that produced them). On CPU the
run is deterministic for a given seed, torch build, CPU and thread count (``--threads``):
``tensor_sha256`` (names, dtypes, shapes and bytes of the tensors) is then equal. On another CPU of the
same capability the last bits may differ (``toy_clip.cpu_fingerprint``), and the retrieval accuracy is
what reproduces.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from raphael_ref import toy_clip as TC  # noqa: E402


def parse_args(argv=None):
    d = TC.ToyClipConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(TC.TOY_CLIP_DIR), help="output folder (default: the shipped asset folder)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--n-train", type=int, default=d.n_train)
    p.add_argument("--n-eval", type=int, default=d.n_eval)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the shipped weights were made with 1; the result depends on it)")
    p.add_argument("--no-progress", action="store_true")
    return p, p.parse_args(argv)


def main(argv=None) -> int:
    p, args = parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    cfg = TC.ToyClipConfig(seed=args.seed, steps=args.steps, batch_size=args.batch_size, n_train=args.n_train,
                           n_eval=args.n_eval, lr=args.lr)
    try:
        cfg.validate()
    except ValueError as e:
        p.error(str(e))
    from raphael_ref.training import writable_dir

    try:
        out = writable_dir(args.out)
    except ValueError as e:
        p.error(f"cannot write to --out: {e}")
    torch.set_num_threads(args.threads)
    model, metrics = TC.pretrain_toy_clip(cfg, progress=not args.no_progress)
    enc_forward = _text_features(model)
    from raphael_ref.data.synthetic import SyntheticShapes

    caps = [SyntheticShapes(seed=3000, image_size=cfg.image_size, length=256).scene(i).caption for i in range(256)]
    metrics["token_cosine_within_caption"] = TC.token_cosine(enc_forward, caps)
    TC.save_open_clip_dir(model, cfg, out)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    record = {
        "command": "python tools/pretrain_clip.py " + " ".join(shlex.quote(a) for a in argv_list),
        "config": dataclasses.asdict(cfg),
        "metrics": metrics,
        # the file's bytes (integrity of the shipped file) and its tensors (reproducibility: safetensors
        # writes its metadata keys in a per-process order, so equal tensors can give different files)
        "sha256": {TC.WEIGHTS_NAME: TC.sha256_file(out / TC.WEIGHTS_NAME)},
        "tensor_sha256": TC.tensor_sha256(out / TC.WEIGHTS_NAME),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": TC.cpu_fingerprint(),  # the capability alone does not fix the last bits (TC.same_float_build)
        "threads": args.threads,
        "machine": platform.machine(),
    }
    (out / TC.PROVENANCE_NAME).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    print(f"wrote {out}")
    return 0


def _text_features(model):
    """ids -> (B, n_y, width): the text tower's ln_final token features, as the U-Net reads them."""
    def forward(ids):
        with torch.no_grad():
            x = model.token_embedding(ids) + model.positional_embedding
            x = model.transformer(x, attn_mask=model.attn_mask)
            return model.ln_final(x)
    return forward


if __name__ == "__main__":
    sys.exit(main())
