#!/usr/bin/env python
"""Binding probe of a frozen text tower: what each object's words carry in a two-object caption.

    python tools/text_probe.py                                      # toy-clip, last and penultimate layer
    python tools/text_probe.py --encoder tiny --layers last --out probe.json

For captions "a C1 S1 <where P1> and a C2 S2 <where P2>" (the benchmark's position prompts), a linear probe
reads each object's shape and colour from the token feature at the last word of each phrase, at each phrase's
shape word and at the pooled (EOT) token (``raphael_ref.toy_clip.binding_probe``). A U-Net query at cell P2 must find object 2 at
the second phrase's words; what of object 1 that token also carries is what can leak into cell P2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from raphael_ref import toy_clip as TC  # noqa: E402
from raphael_ref.text_encoder import LAYERS, TextEncoder  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="toy-clip", help="'toy-clip' (shipped), 'tiny' (random), a JSON tower file")
    p.add_argument("--weights", default=None, help="local weights for --encoder (not needed for toy-clip / tiny)")
    p.add_argument("--layers", nargs="+", choices=LAYERS, default=list(LAYERS))
    p.add_argument("--n", type=int, default=3000, help="captions (2/3 fit the probe, 1/3 score it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.n < 30:
        p.error(f"--n must be >= 30, got {args.n}")
    torch.set_num_threads(1)
    results = {}
    for layer in args.layers:
        try:
            enc = (TextEncoder.tiny(seed=0, layer=layer) if args.encoder == "tiny"
                   else TextEncoder.from_config(args.encoder, args.weights, layer=layer))
        except (ValueError, FileNotFoundError) as e:
            p.error(str(e))
        results[layer] = TC.binding_probe(lambda ids: enc(ids).hidden, n=args.n, seed=args.seed)
    first = next(iter(results.values()))
    ch = first["chance"]
    print(f"text tower {args.encoder}: linear-probe accuracy on {first['n_test']} held-out two-object captions "
          f"(chance: shape {ch['shape']:.2f}, colour {ch['colour']:.2f}; object 2 at word 1, which a causal tower "
          f"cannot see: {ch['shape_unseen']:.2f} / {ch['colour_unseen']:.2f})\n")
    print("| layer | token | shape 1 | colour 1 | shape 2 | colour 2 |")
    print("|---|---|---:|---:|---:|---:|")
    for layer, r in results.items():
        for where in ("word_1", "word_2", "shape_word_1", "shape_word_2", "eot"):
            v = r[where]
            print(f"| {layer} | {where} | {v['shape_1']:.2f} | {v['colour_1']:.2f} | {v['shape_2']:.2f} | "
                  f"{v['colour_2']:.2f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"encoder": args.encoder, "n": args.n, "seed": args.seed,
                                              "layers": results}, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
