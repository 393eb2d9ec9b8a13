"""The toy CLIP (raphael_ref/toy_clip.py, tools/pretrain_clip.py): pretraining tool, shipped tower,
toy CLIP score and the torch-fidelity feature extractor."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raphael_ref import toy_clip as TC
from raphael_ref.data.synthetic import COLORS, make_scene, render
from raphael_ref.text_encoder import TextEncoder

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "pretrain_clip.py"
TINY_ARGS = ["--steps", "3", "--n-train", "64", "--batch-size", "32", "--n-eval", "32", "--no-progress"]


def _run_tool(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), "--out", str(out), *TINY_ARGS, *extra],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clip") / "a"
    r = _run_tool(out)
    assert r.returncode == 0, r.stderr
    return out


def test_tool_writes_an_open_clip_dir_with_provenance(tiny_run):
    files = sorted(p.name for p in tiny_run.iterdir())
    assert files == sorted([TC.CONFIG_NAME, TC.WEIGHTS_NAME, TC.PROVENANCE_NAME])
    prov = json.loads((tiny_run / TC.PROVENANCE_NAME).read_text())
    assert prov["sha256"][TC.WEIGHTS_NAME] == TC.sha256_file(tiny_run / TC.WEIGHTS_NAME)
    assert prov["tensor_sha256"] == TC.tensor_sha256(tiny_run / TC.WEIGHTS_NAME)
    assert prov["config"]["steps"] == 3 and prov["config"]["seed"] == 0
    assert prov["command"].startswith("python tools/pretrain_clip.py")
    # both readers of the folder: the U-Net's frozen text tower and the CLIP scorer
    enc = TextEncoder.from_config(tiny_run / TC.CONFIG_NAME, tiny_run)
    assert (enc.d_y, enc.n_y) == (32, 77)
    from raphael_ref.evaluation.metrics import load_clip

    scorer = load_clip(tiny_run)
    assert scorer.image_size == 24 and scorer.mean == (0.5, 0.5, 0.5)


def test_tool_is_deterministic_for_a_seed(tiny_run, tmp_path):
    again = _run_tool(tmp_path / "b")
    assert again.returncode == 0, again.stderr
    other_seed = _run_tool(tmp_path / "c", "--seed", "1")
    assert other_seed.returncode == 0, other_seed.stderr
    # the tensors, not the file bytes: safetensors orders its metadata keys differently in each process
    h = TC.tensor_sha256(tiny_run / TC.WEIGHTS_NAME)
    assert TC.tensor_sha256(tmp_path / "b" / TC.WEIGHTS_NAME) == h  # same machine, same threads: same bits
    assert TC.tensor_sha256(tmp_path / "c" / TC.WEIGHTS_NAME) != h


@pytest.mark.parametrize("bad, word", [(["--steps", "0"], "steps"), (["--lr", "nan"], "lr"),
                                       (["--batch-size", "128", "--n-train", "64"], "batch_size"),
                                       (["--threads", "0"], "threads")])
def test_tool_rejects_bad_settings(tmp_path, bad, word):
    r = subprocess.run([sys.executable, str(TOOL), "--out", str(tmp_path / "x"), *bad], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "error:" in r.stderr and word in r.stderr
    assert not (tmp_path / "x" / TC.WEIGHTS_NAME).exists()


def test_tool_rejects_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = subprocess.run([sys.executable, str(TOOL), "--out", str(blocker / "sub"), *TINY_ARGS], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "cannot write to --out" in r.stderr


# ------------------------------------------------------------------------ the shipped tower


def test_provenance_records_the_cpu_and_compares_bits_only_on_the_same_one(tiny_run):
    """The capability (AVX512, ...) does not fix the last bits of a float run; the fingerprint (model, the ISA
    extensions oneDNN and MKL dispatch on, caches) is recorded, and bit-for-bit comparison needs all of it."""
    prov = json.loads((tiny_run / TC.PROVENANCE_NAME).read_text())
    fp = TC.cpu_fingerprint()
    assert prov["cpu"] == json.loads(json.dumps(fp)) == TC.cpu_fingerprint()  # recorded, JSON-safe, stable
    assert set(fp) == {"processor", "isa", "cpuid", "caches"}
    assert set(fp["isa"]) <= set(TC._KERNEL_ISA_FLAGS)
    assert TC.same_float_build(prov, dict(prov))
    for key, other in [("torch", "0.0"), ("cpu_capability", prov["cpu_capability"] + "-other"), ("threads", prov["threads"] + 1),
                       ("cpu", {**fp, "isa": [f for f in TC._KERNEL_ISA_FLAGS if f not in fp["isa"]]}),
                       ("cpu", {**fp, "caches": ["L2 Unified 1024K"]})]:
        changed = {**prov, key: other}
        assert not TC.same_float_build(prov, changed) and not TC.same_float_build(changed, prov), key
    unread = {**prov, "cpu": {**fp, "cpuid": None}}  # no /proc/cpuinfo: the processor name alone is too coarse
    assert not TC.same_float_build(unread, dict(unread))
    older = {k: v for k, v in prov.items() if k != "cpu"}  # a record from before the fingerprint
    assert not TC.same_float_build(older, prov) and not TC.same_float_build(older, dict(older))
    shipped = json.loads((TC.TOY_CLIP_DIR / TC.PROVENANCE_NAME).read_text())
    assert "cpu" not in shipped and not TC.same_float_build(shipped, prov)  # the slow test checks its accuracy


def test_shipped_weights_match_their_provenance():
    prov = json.loads((TC.TOY_CLIP_DIR / TC.PROVENANCE_NAME).read_text())
    assert TC.sha256_file(TC.TOY_CLIP_DIR / TC.WEIGHTS_NAME) == prov["sha256"][TC.WEIGHTS_NAME]  # intact file
    assert TC.tensor_sha256(TC.TOY_CLIP_DIR / TC.WEIGHTS_NAME) == prov["tensor_sha256"]
    # the recorded held-out retrieval is far above chance (1 / n_captions)
    m = prov["metrics"]
    assert m["image_to_caption_top1"] > 20 / m["n_captions"]


def test_toy_clip_text_encoder_is_the_pretrained_tower():
    enc = TextEncoder.from_config("toy-clip")
    assert (enc.d_y, enc.n_y) == (32, 77)
    assert not any(p.requires_grad for p in enc.parameters())  # frozen E_theta (Sec. 2)
    clip = TC.load_toy_clip()
    ids = enc.tokenize(["a red circle on the left"])
    # the same tower as the CLIP's text side: token features equal open_clip's ln_final output
    with torch.no_grad():
        x = clip.token_embedding(ids) + clip.positional_embedding
        ref = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
    torch.testing.assert_close(enc(ids).hidden, ref, rtol=1e-5, atol=1e-5)  # float32, same kernels


def test_pretrained_tokens_are_more_distinct_than_random():
    """The measured cause of the old toy's blindness: a random tiny tower's tokens of one caption are alike."""
    caps = ["a red circle on the left", "two blue squares at the top and at the bottom",
            "a green triangle in the center and a white square on the right"]
    pre = TC.token_cosine(lambda ids: TextEncoder.from_config("toy-clip")(ids).hidden, caps)
    rnd = TC.token_cosine(lambda ids: TextEncoder.tiny(seed=0)(ids).hidden, caps)
    # measured on these captions: random 0.69, pretrained 0.49 (256 synthetic captions: 0.69 and 0.43)
    assert rnd - pre > 0.15, (pre, rnd)


@pytest.mark.spec_id("eval.toy_clip_axes")
def test_toy_clip_score_prefers_the_true_colour():
    """Toy CLIP score (Fig. 6b's alignment axis at toy scale): each render scores highest with its own caption
    among the captions that differ from it in the colour word only."""
    from raphael_ref.evaluation.metrics import clip_score, load_clip

    scorer = load_clip(TC.TOY_CLIP_DIR)
    hits, n = 0, 0
    for shape in ("circle", "square", "triangle"):
        for color in COLORS:
            img = render(make_scene([(shape, color, "center")], 24))[None]
            caps = [make_scene([(shape, c, "center")], 24).caption for c in COLORS]
            scores = clip_score(img.expand(len(caps), -1, -1, -1), caps, scorer)
            hits += int(caps[int(scores.argmax())] == make_scene([(shape, color, "center")], 24).caption)
            n += 1
    assert hits / n >= 0.8, f"{hits}/{n}"


@pytest.mark.spec_id("eval.toy_clip_axes")
def test_registered_extractor_features_and_frechet_distance():
    from raphael_ref.evaluation.metrics import fid_kid

    name = TC.register_toy_clip_extractor()
    assert TC.register_toy_clip_extractor() == name  # idempotent
    scenes = [make_scene([(s, c, p)], 24) for s in ("circle", "square", "triangle") for c in COLORS
              for p in ("left", "right", "center")]
    real = torch.stack([render(sc) for sc in scenes])  # (54, 3, 24, 24) uint8
    cls = TC._extractor_class()
    feats = cls(name, ["embed"])(real)[0]
    assert feats.shape == (len(scenes), 64) and torch.isfinite(feats).all()
    same = fid_kid(real, real.clone(), feature_extractor=name, kid=False)["fid"]
    noisy = (real.float() + 60 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 255)
    far = fid_kid(noisy.to(torch.uint8), real, feature_extractor=name, kid=False)["fid"]
    assert abs(same) < 1e-3 and far > 1.0, (same, far)


def test_extractor_resamples_other_sizes():
    cls = TC._extractor_class()
    ext = cls(TC.TOY_CLIP_EXTRACTOR, ["embed"])
    img24 = render(make_scene([("square", "red", "left")], 24))[None]
    img48 = torch.nn.functional.interpolate(img24.float(), scale_factor=2, mode="nearest").to(torch.uint8)
    torch.testing.assert_close(ext(img48)[0], ext(img24)[0])  # area-downsampling a 2x nearest upsample is exact
    with pytest.raises(ValueError, match="uint8"):
        ext(img24.float())


@pytest.mark.slow
def test_tool_reproduces_the_shipped_weights(tmp_path):
    """The provenance command reproduces the shipped tower: bit for bit on the recorded torch, CPU (capability
    and fingerprint) and thread count, else to the recorded retrieval accuracy (the float kernels' last bits
    differ across CPUs, even of one capability: TC.cpu_fingerprint)."""
    prov = json.loads((TC.TOY_CLIP_DIR / TC.PROVENANCE_NAME).read_text())
    args = shlex.split(prov["command"])[2:]
    if "--out" in args:
        i = args.index("--out")
        del args[i:i + 2]
    r = subprocess.run([sys.executable, str(TOOL), *args, "--out", str(tmp_path), "--no-progress"],
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr
    new = json.loads((tmp_path / TC.PROVENANCE_NAME).read_text())
    if TC.same_float_build(new, prov):
        assert new["tensor_sha256"] == prov["tensor_sha256"]
    assert abs(new["metrics"]["image_to_caption_top1"] - prov["metrics"]["image_to_caption_top1"]) < 0.03


def test_binding_probe_reads_each_phrase_last_word():
    """The probe's token indices point at the last word of each object's phrase (the position word)."""
    from raphael_ref.data.synthetic import POSITIONS, SHAPES

    ids, labels, last_1, last_2, shape_1, shape_2, n_shapes, n_colours = TC._two_object_captions(40, seed=1)
    word_id = {p: int(TC._tokenize([p])[0, 1]) for p in POSITIONS}  # SOT, the word, EOT
    and_id = int(TC._tokenize(["and"])[0, 1])
    shape_end = {s: int(TC._tokenize([s])[0, (TC._tokenize([s])[0] != 0).sum() - 2]) for s in SHAPES}  # last BPE
    assert (n_shapes, n_colours) == (3, 6)
    for b in range(40):
        assert int(ids[b, shape_1[b]]) == shape_end[SHAPES[labels[b, 0]]]
        assert int(ids[b, shape_2[b]]) == shape_end[SHAPES[labels[b, 2]]]
        assert shape_1[b] < last_1[b] < shape_2[b] < last_2[b]
        assert int(ids[b, last_1[b]]) in word_id.values() and int(ids[b, last_2[b]]) in word_id.values()
        assert int(ids[b, last_1[b] + 1]) == and_id  # the first phrase ends right before "and"
        assert int(ids[b, last_2[b] + 1]) == int(ids[b].max())  # EOT right after the second phrase
        assert last_1[b] < last_2[b]
        assert labels[b, 0] != labels[b, 2] and labels[b, 1] != labels[b, 3]  # distinct shapes and colours


def test_binding_probe_on_the_toy_clip_tower():
    """Measured on 3000 captions (docs/results/toy_budget_eval.md, section 3): at the first phrase's last word the
    toy CLIP tower gives object 1 exactly (shape and colour 1.00) and, being causal, object 2 only at the
    conditional chance of "not object 1" (0.5 / 0.2); at the second phrase's last word object 2 reads 0.82 / 0.64
    and object 1 still 0.88 / 0.70 (the leak). Here 600 captions, 200 held out: binomial se <= 0.035."""
    enc = TextEncoder.from_config("toy-clip")
    r = TC.binding_probe(lambda ids: enc(ids).hidden, n=600, seed=0)
    assert r["n_test"] == 200
    w1, w2 = r["word_1"], r["word_2"]
    assert w1["shape_1"] > 0.9 and w1["colour_1"] > 0.9, w1
    # a causal tower cannot know object 2 at word 1: conditional chance, within 4 se
    assert w1["shape_2"] < 0.5 + 4 * 0.035 and w1["colour_2"] < 0.2 + 4 * 0.029, w1
    # at word 2 object 2 is read well above chance (1/3, 1/6)
    assert w2["shape_2"] > 0.6 and w2["colour_2"] > 0.4, w2
    # the second shape word carries both shapes (3000 captions: 1.00 / 1.00 at the last layer; the first named
    # shape leaks into every later token of a causal tower), the first shape word only its own (object 2 at chance)
    s1, s2 = r["shape_word_1"], r["shape_word_2"]
    assert s1["shape_1"] > 0.9 and s1["shape_2"] < 0.5 + 4 * 0.035, s1
    assert s2["shape_2"] > 0.9 and s2["shape_1"] > 0.9, s2
    with pytest.raises(ValueError, match="n >= 30"):
        TC.binding_probe(lambda ids: enc(ids).hidden, n=10)
    with pytest.raises(ValueError, match="train_fraction"):
        TC.binding_probe(lambda ids: enc(ids).hidden, n=100, train_fraction=0.95)


def test_text_probe_tool_writes_its_table_and_json(tmp_path):
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "text_probe.py"), "--encoder", "tiny", "--layers", "last",
                        "--n", "60", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| last | word_2 |" in r.stdout and "| last | shape_word_2 |" in r.stdout
    got = json.loads(out.read_text())
    assert got["encoder"] == "tiny" and set(got["layers"]) == {"last"}
    assert set(got["layers"]["last"]["word_2"]) == {"shape_1", "colour_1", "shape_2", "colour_2"}
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "text_probe.py"), "--n", "5"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "--n must be >= 30" in bad.stderr
