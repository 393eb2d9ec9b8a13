"""Diffusion-path analysis (Sec. 3.1 Fig. 4/10, App. 7.3 Fig. 9): concept prompts, word tokens, the path
classifier with stratified CV, time-expert usage, expert frequencies, and tools/routes.py on a micro checkpoint."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from raphael_ref.testing import load_tool
from raphael_ref import training as T
from raphael_ref.checkpoint import load_model, save_model
from raphael_ref.config import get_preset
from raphael_ref.diffusion import NoiseSchedule
from raphael_ref.evaluation import plots
from raphael_ref.evaluation import routes as R
from raphael_ref.models import RaphaelUNet
from raphael_ref.text_encoder import TextEncoder, clip_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MICRO = {"model.sample_size": 16, "model.model_channels": 16, "model.head_dim": 8, "model.norm_groups": 4,
         "model.expert_mult": 2, "model.edge_width": 4, "model.channel_mult": [1, 2], "model.num_res_blocks": 1,
         "model.transformer_down": [1, 1], "model.transformer_up": [1, 1]}
CLASSIFIERS = ["naive_bayes", pytest.param("xgboost", marks=pytest.mark.skipif(
    importlib.util.find_spec("xgboost") is None, reason="xgboost not installed (pip install xgboost-cpu)"))]


@pytest.fixture(scope="module")
def routes_tool():
    return load_tool("routes")


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory):
    cfg = get_preset("toy", MICRO)
    torch.manual_seed(cfg.train.seed)
    return save_model(tmp_path_factory.mktemp("ckpt"), RaphaelUNet(cfg.model), cfg)


# ------------------------------------------------------------------------------ prompts and tokens


@functools.lru_cache(maxsize=1)
def _tiny() -> TextEncoder:
    return TextEncoder.tiny()


@settings(max_examples=10)
@given(kind=st.sampled_from(list(R.CONCEPT_KINDS)), n=st.integers(1, 12), max_objects=st.integers(1, 3))
def test_concept_prompts_name_their_concept_once(kind, n, max_objects):
    ps = R.concept_prompts(kind, n, max_objects=max_objects)
    concepts = R.CONCEPT_KINDS[kind]
    assert len(ps) == n * len(concepts)
    assert [p.concept for p in ps] == [c for c in concepts for _ in range(n)]
    assert len({p.prompt for p in ps}) == len(ps)  # distinct prompts
    ids = _tiny().tokenize([p.prompt for p in ps])
    for p, row in zip(ps, ids):
        words = p.prompt.replace(",", " ").split()
        assert words.count(p.word) == 1, p.prompt
        assert row[R.word_token_index(row, p.word)] == clip_tokenizer().encode(p.word)[-1]
        assert 1 <= p.prompt.count(" and ") + p.prompt.count(", ") + 1 <= max_objects
    assert R.concept_prompts(kind, n, max_objects=max_objects) == ps  # a pure function


def test_concept_prompts_vary_the_context_and_refuse_impossible_requests():
    ps = R.concept_prompts("colors", 20)
    prefixes = {p.prompt.split(p.word)[0] for p in ps if p.concept == "red"}
    assert len(prefixes) > 5  # the words before the concept vary
    with pytest.raises(ValueError, match="distinct"):
        R.concept_prompts("shapes", 50, max_objects=1)  # only 6 colours x 5 positions = 30 exist per shape
    with pytest.raises(ValueError, match="kind"):
        R.concept_prompts("verbs", 3)


def test_word_token_index_takes_the_last_bpe_token():
    enc = _tiny()
    word = "hydrangeas"
    pieces = clip_tokenizer().encode(word)
    assert len(pieces) > 1  # a multi-token word
    ids = enc.tokenize(["a watercolor of purple hydrangeas"])[0]
    i = R.word_token_index(ids, word)
    assert ids[i - len(pieces) + 1:i + 1].tolist() == pieces
    with pytest.raises(ValueError, match="occurs 0 times"):
        R.word_token_index(ids, "tulips")
    with pytest.raises(ValueError, match="occurs 2 times"):
        R.word_token_index(enc.tokenize(["a red circle and a red square"])[0], "red")
    ps = R.template_prompts(["lake", "castle"], ["a photo of a {}", "a {} at night"])
    assert [p.prompt for p in ps] == ["a photo of a lake", "a lake at night", "a photo of a castle", "a castle at night"]
    with pytest.raises(ValueError, match=r"one '\{\}'"):
        R.template_prompts(["lake"], ["a photo"])


# ------------------------------------------------------------------------------ classifier


@pytest.mark.spec_id("eval.path_classifier")
@settings(max_examples=10)
@given(counts=st.lists(st.integers(5, 17), min_size=2, max_size=6), k=st.integers(2, 5), seed=st.integers(0, 99))
def test_stratified_folds_partition_and_balance(counts, k, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    folds = R.stratified_folds(labels, k, seed)
    assert len(folds) == k
    allidx = np.concatenate(folds)
    assert sorted(allidx.tolist()) == list(range(len(labels)))  # a partition
    for c, n in enumerate(counts):
        per = [int((labels[f] == c).sum()) for f in folds]
        assert set(per) <= {n // k, -(-n // k)}  # floor or ceil of n / k per fold
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match=">= k"):
        R.stratified_folds(labels, max(counts) + 1, seed)


def _separable(n_per: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each class a fixed random 16-entry path; a quarter of the entries re-drawn at random per sample."""
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 6, (n_classes, 16))
    y = np.repeat(np.arange(n_classes), n_per)
    x = protos[y].copy()
    noisy = rng.random(x.shape) < 0.25
    x[noisy] = rng.integers(0, 6, int(noisy.sum()))
    return x, y


@pytest.mark.spec_id("eval.path_classifier")
@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_classifier_separates_separable_paths(classifier):
    x, y = _separable(30, 6, 0)
    res = R.path_classifier_cv(x, [f"w{c}" for c in y], classifier=classifier)
    assert res["n"] == 180 and res["n_classes"] == 6 and res["folds"] == 5 and len(res["fold_accuracies"]) == 5
    assert res["chance"] == pytest.approx(1 / 6)
    assert res["accuracy_mean"] > 0.95
    assert res["accuracy_std"] == pytest.approx(np.std(res["fold_accuracies"]))


@pytest.mark.spec_id("eval.path_classifier")
@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_classifier_is_at_chance_on_random_paths(classifier):
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(5), 60)
    x = rng.integers(0, 6, (300, 16))  # independent of the labels
    res = R.path_classifier_cv(x, y.tolist(), classifier=classifier)
    # chance 0.2; the std of a 300-sample accuracy at p = 0.2 is 0.023: 0.2 +- 5 sigma
    assert abs(res["accuracy_mean"] - res["chance"]) < 0.115


def test_classifier_rejects_bad_input():
    with pytest.raises(ValueError, match=">= 2 classes"):
        R.path_classifier_cv(np.zeros((10, 4)), [0] * 10)
    with pytest.raises(ValueError, match="labels for"):
        R.path_classifier_cv(np.zeros((10, 4)), [0, 1])
    with pytest.raises(ValueError, match="unknown classifier"):
        R.path_classifier_cv(np.zeros((10, 4)), [0, 1] * 5, classifier="svm")


# ------------------------------------------------------------------------------ statistics


@pytest.mark.spec_id("eval.time_expert_usage")
@settings(max_examples=15)
@given(S=st.integers(1, 6), K=st.integers(1, 4), B=st.integers(1, 5), n=st.integers(1, 5), seed=st.integers(0, 99))
def test_time_expert_usage_equals_the_count(S, K, B, n, seed):
    g = torch.Generator().manual_seed(seed)
    routes = torch.randint(0, n, (S, K, B), generator=g)
    routes[:, 0] = -1 if K > 1 else routes[:, 0]  # the first block has no time-MoE (when there are others)
    usage = R.time_expert_usage(routes, n)
    assert usage.shape == (K, S, n) and usage.dtype == torch.float64
    for k in range(K):
        for s in range(S):
            if K > 1 and k == 0:
                assert torch.isnan(usage[k, s]).all()
                continue
            for e in range(n):
                assert usage[k, s, e] == sum(int(routes[s, k, b]) == e for b in range(B)) / B
            assert usage[k, s].sum() == pytest.approx(1.0)


@pytest.mark.spec_id("eval.space_expert_frequency")
@settings(max_examples=15)
@given(N=st.integers(1, 20), K=st.integers(1, 5), C=st.integers(1, 4), k=st.integers(1, 6), seed=st.integers(0, 99))
def test_space_expert_frequency_equals_the_count(N, K, C, k, seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randint(0, k, (N, K), generator=g)
    labels = torch.arange(N) % C
    freq = R.space_expert_frequency(feats, labels, C, k)
    assert freq.shape == (C, K, k)
    for c in range(C):
        members = [i for i in range(N) if int(labels[i]) == c]
        for j in range(K):
            for e in range(k):
                expect = sum(int(feats[i, j]) == e for i in members) / len(members) if members else float("nan")
                if members:
                    assert freq[c, j, e] == pytest.approx(expect, abs=1e-15)
                else:
                    assert torch.isnan(freq[c, j, e])


def test_route_step_invariance_and_features():
    space = torch.tensor([[[0, 1], [2, 3]], [[0, 1], [2, 4]]])  # (S=2, K=2, N=2)
    assert R.route_step_invariance(space) == 0.75
    feats, blocks = R.path_features(space, 1)
    assert feats.tolist() == [[0, 2], [1, 4]] and blocks == [0, 1]
    with pytest.raises(ValueError, match="no block has a space-MoE"):
        R.path_features(torch.full((1, 3, 2), -1), 0)


# ------------------------------------------------------------------------------ collection and the tool


@pytest.mark.spec_id("eval.path_classifier")
def test_collected_paths_are_the_text_gate_argmax_of_the_word_token(micro_checkpoint):
    """The path read from sampling is the eval-mode text gate's argmax at the concept word's token, in every block
    and at every step (eval gates are deterministic in the text: no noise, no dependence on x_t or t)."""
    torch.set_num_threads(1)  # restored by _keep_torch_threads; 2 threads stall on a shared 2-core CPU
    model, cfg = load_model(micro_checkpoint)
    model.eval()
    encoder = T.build_text_encoder(cfg)
    schedule = NoiseSchedule.make(cfg.diffusion.schedule, cfg.diffusion.T)
    prompts = R.concept_prompts("positions", 2)
    paths = R.collect_concept_paths(model, schedule, encoder, prompts, steps=3, guidance=3.0, batch_size=4)
    S, K, N = paths.space.shape
    assert (S, K, N) == (3, cfg.n_transformer_blocks, len(prompts))
    enc = encoder([p.prompt for p in prompts])
    for j, block in enumerate(model.transformer_blocks()):
        logits = block.text_gate(enc.hidden)  # (N, n_y, k)
        expect = logits.argmax(-1)[torch.arange(N), paths.token_index]  # (N,)
        assert torch.equal(paths.space[:, j], expect.expand(S, N))
    assert R.route_step_invariance(paths.space) == 1.0
    assert paths.timesteps.tolist() == sorted(paths.timesteps.tolist(), reverse=True)


@pytest.mark.spec_id("eval.path_classifier")
@pytest.mark.spec_id("eval.time_expert_usage")
@pytest.mark.spec_id("eval.space_expert_frequency")
def test_routes_tool_end_to_end_micro(routes_tool, micro_checkpoint, tmp_path):
    out = tmp_path / "routes"
    report = routes_tool.main([str(micro_checkpoint), "--out", str(out), "--kinds", "colors", "shapes",
                               "--per-concept", "5", "--steps", "2", "--fig9-steps", "3", "--fig9-prompts", "4",
                               "--threads", "1", "--compare-init"])
    for f in ("routes.json", "routes.md", "time_experts.png", "paths_colors.png", "paths_shapes.png"):
        assert (out / f).is_file(), f
    for f in ("time_experts.png", "paths_colors.png"):
        with Image.open(out / f) as im:
            assert im.format == "PNG" and im.width > 300
    data = json.loads((out / "routes.json").read_text())
    assert data == json.loads(json.dumps(report))
    cols = data["kinds"]["colors"]
    assert cols["n_prompts"] == 30 and cols["concepts"] == list(R.CONCEPT_KINDS["colors"])
    cv = cols["classifier"]
    assert 0.0 <= cv["accuracy_mean"] <= 1.0 and cv["chance"] == pytest.approx(1 / 6) and len(cv["fold_accuracies"]) == 5
    # the checkpoint IS the random initialisation (same seed): both scores agree
    assert cols["random_init"]["accuracy_mean"] == cv["accuracy_mean"]
    assert cols["step_invariance"] == 1.0
    freq = np.array(cols["frequency"])  # (C, K, k)
    assert freq.shape == (6, 5, 6) and np.allclose(freq.sum(axis=2), 1.0)
    usage = np.array(data["time_usage"], dtype=float)  # (K, S, n_t)
    assert usage.shape == (5, 3, 4) and np.allclose(usage.sum(axis=2), 1.0)
    assert set(np.unique(usage)) <= {0.0, 1.0}  # eval time gates are deterministic in t
    assert len(data["time_segments"]) == 5 and all(seg[0][1] == 0 and seg[-1][2] == 2 for seg in data["time_segments"])
    assert data["time_segments_init"] == data["time_segments"]  # the checkpoint is its own random init
    assert (out / "time_experts_init.png").is_file()
    md = (out / "routes.md").read_text()
    assert "| colors (" in md and "| blocks using more than one expert |" in md


def test_routes_tool_word_list(routes_tool, micro_checkpoint, tmp_path, capsys):
    words = tmp_path / "words.txt"
    words.write_text("majestic\nserene\nhydrangeas\n")
    templates = ["a {} lake", "a photo of a {} castle", "an oil painting, {} and calm", "{} mountains at dawn",
                 "the {} sea"]
    argv = [str(micro_checkpoint), "--out", str(tmp_path / "w"), "--words", str(words), "--steps", "1",
            "--fig9-steps", "2", "--fig9-prompts", "2", "--threads", "1"]
    report = routes_tool.main(argv + [a for t in templates for a in ("--template", t)])
    w = report["kinds"]["words"]
    assert w["concepts"] == ["majestic", "serene", "hydrangeas"] and w["n_prompts"] == 15
    assert w["classifier"]["n"] == 15 and w["classifier"]["chance"] == pytest.approx(1 / 3)
    assert (tmp_path / "w" / "paths_words.png").is_file()
    with pytest.raises(SystemExit):
        routes_tool.parse_args(argv + ["--template", "a {}"])  # one template: one path per word, no 5-fold CV
    assert ">= 5 --template" in capsys.readouterr().err


def test_time_expert_plot_marks_blocks_without_time_moe(tmp_path):
    usage = torch.rand(3, 4, 2, dtype=torch.float64)
    usage = usage / usage.sum(-1, keepdim=True)
    usage[1] = float("nan")
    p = plots.time_expert_plot(usage, [750, 500, 250, 0], tmp_path / "t.png")
    with Image.open(p) as im:
        assert im.format == "PNG"
    with pytest.raises(ValueError, match="timesteps"):
        plots.time_expert_plot(usage, [1, 2], tmp_path / "u.png")
