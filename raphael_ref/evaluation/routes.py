"""Diffusion-path analysis of RAPHAEL Sec. 3.1 (Fig. 4, 10) and App. 7.3 (Fig. 9).

Sec. 3.1: "we input each adjective into the RAPHAEL model with prompt templates ... and collect
their corresponding diffusion paths ... By treating these pathways as features (i.e., each path is
a vector of 16 entries), we train a straightforward classifier (e.g., XGBoost [17]) to categorize
the words. The classifier after 5-fold cross-validation achieves over 93% accuracy." App. 7.3 / Fig. 9
plots, per transformer block, which time expert handles which DDIM step.

Here:

- a **path** of a word is the space expert its token is routed to in each of the K transformer
  blocks (``sampling.DiffusionPaths.space_routes[step, :, b, token]``), read at one sampler step;
  a word of several BPE tokens is represented by its last token (the text encoder is causal, so
  the last token is the first that has seen the whole word);
- concept prompt sets come from the synthetic vocabulary (colours, shapes, positions), written in
  the training caption template with 1..3 objects so that the words before the concept word vary
  (:func:`concept_prompts`); real checkpoints take any word list and templates
  (:func:`template_prompts`);
- the classifier is XGBoost (CPU build) scored by stratified k-fold cross-validation
  (:func:`path_classifier_cv`); a categorical naive Bayes (:class:`CategoricalNaiveBayes`) is the
  documented fallback where XGBoost is not installed.

What to expect (and to state with every number): in ``eval()`` the text gate is deterministic and
sees only the token's text representation E(y_i) (Sec. 3.1, route(y_i) = argmax(G(E(y_i)))), which
under a causal text encoder depends only on the words up to and including it. A path therefore does
not depend on the noise, the seed, the step or the guidance weight, and two prompts that agree up
to the concept word have the same path. The classifier measures how much of the concept survives
the gate's argmax given the varying context, and even an untrained gate separates words (a random
projection of distinct embeddings): compare a trained checkpoint with its random initialisation
(``tools/routes.py --compare-init``). Time routes depend only on t, so Fig. 9's shares are 0 or 1
per step in eval mode.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch

from raphael_ref.data.synthetic import COLORS, POSITIONS, SHAPES, make_scene

__all__ = [
    "CONCEPT_KINDS",
    "ROUTES_SEED",
    "CategoricalNaiveBayes",
    "ConceptPaths",
    "XGBoostPaths",
    "ConceptPrompt",
    "available_classifier",
    "collect_concept_paths",
    "concept_prompts",
    "path_classifier_cv",
    "path_features",
    "route_step_invariance",
    "space_expert_frequency",
    "stratified_folds",
    "template_prompts",
    "time_expert_usage",
    "word_token_index",
]

CONCEPT_KINDS: dict[str, tuple[str, ...]] = {"colors": tuple(COLORS), "shapes": SHAPES, "positions": POSITIONS}
ROUTES_SEED = 20230602  # the concept prompt sets' own seed (never a training seed)


# ---------------------------------------------------------------------------------------------
# prompt sets
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConceptPrompt:
    """A prompt, the concept (class label) it stands for and the word whose token path is read."""

    prompt: str
    concept: str
    word: str


def concept_prompts(kind: str, n_per_concept: int, *, seed: int = ROUTES_SEED, max_objects: int = 3,
                    image_size: int = 32) -> list[ConceptPrompt]:
    """``n_per_concept`` distinct synthetic captions per concept of ``kind`` ("colors", "shapes", "positions").

    Each caption (the training template, ``data.synthetic.caption_for``) has 1..max_objects objects
    at distinct positions; exactly one object carries the concept (its colour, shape or position)
    and the others carry other values, so the concept word occurs once. Its slot among the objects
    is drawn uniformly, so the words before it vary. A pure function of the arguments.
    """
    if kind not in CONCEPT_KINDS:
        raise ValueError(f"concept_prompts: kind must be one of {list(CONCEPT_KINDS)}; got {kind!r}")
    if isinstance(n_per_concept, bool) or not isinstance(n_per_concept, int) or n_per_concept < 1:
        raise ValueError(f"concept_prompts: n_per_concept must be an int >= 1; got {n_per_concept!r}")
    limit = len(SHAPES) if kind == "shapes" else len(POSITIONS)
    if not 1 <= max_objects <= limit:
        raise ValueError(f"concept_prompts: max_objects must lie in [1, {limit}] for {kind}; got {max_objects}")
    colors = tuple(COLORS)
    out: list[ConceptPrompt] = []
    for ci, concept in enumerate(CONCEPT_KINDS[kind]):
        rng = np.random.default_rng([seed, list(CONCEPT_KINDS).index(kind), ci])
        seen: set[str] = set()
        attempts = 0
        while len(seen) < n_per_concept:
            attempts += 1
            if attempts > 10_000 + 100 * n_per_concept:
                raise ValueError(f"concept_prompts: only {len(seen)} distinct {kind} prompts for {concept!r} exist "
                                 f"with max_objects={max_objects}; ask for fewer than {n_per_concept}")
            n = int(rng.integers(1, max_objects + 1))
            slot = int(rng.integers(n))
            positions = [POSITIONS[j] for j in rng.choice(len(POSITIONS), size=n, replace=False)]
            if kind == "positions" and concept not in positions:
                positions[slot] = concept
            elif kind == "positions":
                slot = positions.index(concept)
            others_shape = [s for s in SHAPES if s != concept] if kind == "shapes" else list(SHAPES)
            others_color = [c for c in colors if c != concept] if kind == "colors" else list(colors)
            objects = []
            for i in range(n):
                shape = concept if (kind == "shapes" and i == slot) else others_shape[rng.integers(len(others_shape))]
                color = concept if (kind == "colors" and i == slot) else others_color[rng.integers(len(others_color))]
                objects.append((shape, color, positions[i]))
            if len({(s, c) for s, c, _ in objects}) < n:  # a repeated (shape, colour) reads as a count caption
                continue
            caption = make_scene(objects, image_size).caption
            if caption in seen:
                continue
            seen.add(caption)
            out.append(ConceptPrompt(caption, concept, concept))
    return out


def template_prompts(words: Sequence[str], templates: Sequence[str]) -> list[ConceptPrompt]:
    """Every word in every template (``"a photo of a {}"``): prompts for a real checkpoint's word list.

    With deterministic (eval) gates a word's path depends only on the words up to it, so one
    template gives one path per word: use several templates (the paper used GPT-written ones).
    """
    words = [w.strip() for w in words if w.strip()]
    if not words:
        raise ValueError("template_prompts: the word list is empty")
    if len(set(words)) != len(words):
        raise ValueError(f"template_prompts: words listed twice: {sorted({w for w in words if words.count(w) > 1})}")
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise ValueError(f"template_prompts: each template needs exactly one '{{}}' for the word; got {list(templates)!r}")
    if len(set(templates)) != len(templates):
        raise ValueError("template_prompts: templates listed twice")
    return [ConceptPrompt(t.format(w), w, w) for w in words for t in templates]


def word_token_index(ids: torch.Tensor, word: str) -> int:
    """Position in ``ids`` (n_y,) of the last BPE token of ``word``'s one occurrence (CLIP tokenizer).

    Raises ValueError when the word does not occur (e.g. truncated away) or occurs more than once.
    """
    from raphael_ref.text_encoder import clip_tokenizer

    if not isinstance(ids, torch.Tensor) or ids.ndim != 1:
        raise ValueError(f"word_token_index: ids must be one prompt's token ids (n_y,); got {getattr(ids, 'shape', ids)}")
    pieces = clip_tokenizer().encode(word)
    if not pieces:
        raise ValueError(f"word_token_index: {word!r} has no BPE tokens")
    row, L = ids.tolist(), len(pieces)
    hits = [i for i in range(len(row) - L + 1) if row[i:i + L] == pieces]
    if len(hits) != 1:
        raise ValueError(f"word_token_index: {word!r} (BPE {pieces}) occurs {len(hits)} times in the prompt's ids; "
                         f"each prompt must name its concept word exactly once")
    return hits[0] + L - 1


# ---------------------------------------------------------------------------------------------
# collection
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ConceptPaths:
    """Routes of the concept word's token of each prompt while sampling.

    space:      (S, K, N) long, the space expert of the word's token per step and block (-1: no space-MoE).
    time:       (S, K, N) long, the time expert of each sample per step and block (-1: no time-MoE).
    timesteps:  (S,) long, the model timestep of each sampler step (descending).
    token_index: (N,) long, the word's token position in each prompt.
    """

    space: torch.Tensor
    time: torch.Tensor
    timesteps: torch.Tensor
    token_index: torch.Tensor


@torch.no_grad()
def collect_concept_paths(model, schedule, encoder, prompts: Sequence[ConceptPrompt], *, steps: int = 25,
                          guidance: float = 4.5, sampler: str = "ddim", seed: int = 0, batch_size: int = 64,
                          progress=None) -> ConceptPaths:
    """Sample one image per prompt with ``sampling.sample(collect_paths=True)`` and keep the routes of
    each prompt's concept-word token. Classifier-free guidance against the empty prompt; prompts are
    batched, the noise of batch j drawn from ``Generator().manual_seed(seed + j)``."""
    from raphael_ref.sampling import sample

    if not prompts:
        raise ValueError("collect_concept_paths: no prompts")
    if batch_size < 1:
        raise ValueError(f"collect_concept_paths: batch_size must be >= 1; got {batch_size}")
    cfg = model.cfg
    empty = encoder([""]) if guidance != 1.0 else None
    space, time_, token_index, timesteps = [], [], [], None
    for j, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start:start + batch_size]
        enc = encoder([p.prompt for p in chunk])
        idx = torch.tensor([word_token_index(enc.ids[b].cpu(), p.word) for b, p in enumerate(chunk)])  # (B,)
        uncond = None if empty is None else (empty.hidden, empty.valid, empty.pooled_index)
        _, paths = sample(model, schedule, (enc.hidden, enc.valid, enc.pooled_index), uncond,
                          shape=(len(chunk), cfg.in_channels, cfg.sample_size, cfg.sample_size),
                          steps=None if sampler == "ddpm" else steps, guidance=guidance, sampler=sampler,
                          generator=torch.Generator().manual_seed(seed + j), collect_paths=True)
        b = torch.arange(len(chunk))
        space.append(paths.space_routes[:, :, b, idx])  # (S, K, B)
        time_.append(paths.time_routes)  # (S, K, B)
        token_index.append(idx)
        timesteps = paths.timesteps
        if progress is not None:
            progress(start + len(chunk), len(prompts))
    return ConceptPaths(torch.cat(space, dim=2), torch.cat(time_, dim=2), timesteps, torch.cat(token_index))


def path_features(space: torch.Tensor, step: int) -> tuple[torch.Tensor, list[int]]:
    """RAPHAEL Sec. 3.1 (path classifier): each path is a vector of K entries (16 in the paper).

    space: (S, K, N) routes of the concept tokens. Returns ``(features (N, K'), blocks)``: the routes
    at sampler step ``step`` of the K' blocks that have a space-MoE (routes >= 0), and their indices.
    """
    if not isinstance(space, torch.Tensor) or space.ndim != 3:
        raise ValueError(f"path_features: space routes must be (S, K, N); got {getattr(space, 'shape', space)}")
    S = space.shape[0]
    if not -S <= step < S:
        raise ValueError(f"path_features: step {step} out of range for {S} sampler steps")
    at = space[step]  # (K, N)
    blocks = [k for k in range(at.shape[0]) if bool((at[k] >= 0).all())]
    if not blocks:
        raise ValueError("path_features: no block has a space-MoE (model.use_space_moe = false?): no paths to classify")
    return at[blocks].T.contiguous(), blocks  # (N, K')


def route_step_invariance(space: torch.Tensor) -> float:
    """Fraction of (block, token) pairs whose space route is the same at every sampler step."""
    if not isinstance(space, torch.Tensor) or space.ndim != 3 or space.shape[0] < 1:
        raise ValueError(f"route_step_invariance: space routes must be (S >= 1, K, N); got {getattr(space, 'shape', space)}")
    return float((space == space[:1]).all(dim=0).double().mean())


# ---------------------------------------------------------------------------------------------
# statistics of Fig. 9 and Fig. 4 / 10
# ---------------------------------------------------------------------------------------------


def time_expert_usage(time_routes: torch.Tensor, n_experts: int) -> torch.Tensor:
    """RAPHAEL App. 7.3 (Fig. 9): share of samples routed to each time expert, per block and sampler step.

    time_routes: (S, K, B) long, -1 where a block has no time-MoE. Returns float64 (K, S, n_experts):
    usage[k, s, e] = #{b : route[s, k, b] = e} / B; rows of blocks without time-MoE are NaN.
    """
    if not isinstance(time_routes, torch.Tensor) or time_routes.ndim != 3 or time_routes.dtype != torch.long:
        raise ValueError(f"time_expert_usage: time_routes must be a long (S, K, B) tensor; got "
                         f"{getattr(time_routes, 'dtype', type(time_routes))} {getattr(time_routes, 'shape', '')}")
    if n_experts < 1 or int(time_routes.max()) >= n_experts or int(time_routes.min()) < -1:
        raise ValueError(f"time_expert_usage: routes must lie in [-1, {n_experts - 1}] for {n_experts} experts; got "
                         f"[{int(time_routes.min())}, {int(time_routes.max())}]")
    S, K, B = time_routes.shape
    onehot = torch.nn.functional.one_hot(time_routes.clamp_min(0), n_experts).double()  # (S, K, B, n_t)
    usage = onehot.mean(dim=2).permute(1, 0, 2).contiguous()  # (K, S, n_t)
    absent = (time_routes < 0).any(dim=2).T  # (K, S)
    usage[absent] = float("nan")
    return usage


def space_expert_frequency(features: torch.Tensor, labels: torch.Tensor, n_concepts: int,
                           n_experts: int) -> torch.Tensor:
    """RAPHAEL Sec. 3.1 (Fig. 4 / 10): per concept, how often each space expert is chosen in each block.

    features: (N, K) long paths; labels: (N,) long in [0, n_concepts). Returns float64 (C, K, k):
    freq[c, j, e] = #{n : label_n = c, features[n, j] = e} / #{n : label_n = c} (NaN for an empty class).
    """
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.dtype != torch.long:
        raise ValueError(f"space_expert_frequency: features must be long (N, K); got "
                         f"{getattr(features, 'dtype', type(features))} {getattr(features, 'shape', '')}")
    if not isinstance(labels, torch.Tensor) or labels.shape != features.shape[:1]:
        raise ValueError(f"space_expert_frequency: labels must be (N,) = ({features.shape[0]},); got "
                         f"{getattr(labels, 'shape', labels)}")
    if features.numel() and (int(features.min()) < 0 or int(features.max()) >= n_experts):
        raise ValueError(f"space_expert_frequency: routes must lie in [0, {n_experts - 1}]")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_concepts):
        raise ValueError(f"space_expert_frequency: labels must lie in [0, {n_concepts - 1}]")
    onehot = torch.nn.functional.one_hot(features, n_experts).double()  # (N, K, k)
    by_class = torch.nn.functional.one_hot(labels.long(), n_concepts).double()  # (N, C)
    counts = torch.einsum("nc,nke->cke", by_class, onehot)  # (C, K, k)
    return counts / by_class.sum(dim=0)[:, None, None]


# ---------------------------------------------------------------------------------------------
# the path classifier
# ---------------------------------------------------------------------------------------------


def stratified_folds(labels: Sequence[int] | np.ndarray, k: int = 5, seed: int = 0) -> list[np.ndarray]:
    """Test indices of k stratified folds: each class's samples shuffled (seeded) and dealt round-robin,
    so every fold holds floor or ceil of n_c / k samples of class c. Needs >= k samples per class."""
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"stratified_folds: labels must be a non-empty 1-d sequence; got shape {y.shape}")
    if k < 2:
        raise ValueError(f"stratified_folds: k must be >= 2; got {k}")
    classes, counts = np.unique(y, return_counts=True)
    if counts.min() < k:
        raise ValueError(f"stratified_folds: every class needs >= k = {k} samples; class {classes[counts.argmin()]!r} "
                         f"has {counts.min()} (collect more prompts per concept or lower the fold count)")
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for c in classes:
        idx = rng.permutation(np.flatnonzero(y == c))
        for j, i in enumerate(idx):
            folds[(j + offset) % k].append(int(i))
        offset += len(idx)  # start the next class where this one stopped: balanced fold sizes
    return [np.sort(np.array(f, dtype=np.int64)) for f in folds]


class CategoricalNaiveBayes:
    """Naive Bayes over categorical entries (each block's expert index), Laplace smoothing ``smoothing``.

    The fallback classifier where XGBoost is not installed: p(c | path) ~ p(c) prod_j p(path_j | c).
    """

    def __init__(self, smoothing: float = 1.0):
        if smoothing <= 0:
            raise ValueError(f"CategoricalNaiveBayes: smoothing must be > 0; got {smoothing}")
        self.smoothing = smoothing

    def fit(self, x: np.ndarray, y: np.ndarray) -> "CategoricalNaiveBayes":
        x, y = np.asarray(x, dtype=np.int64), np.asarray(y, dtype=np.int64)
        self.n_values = int(x.max()) + 1 if x.size else 1
        self.n_classes = int(y.max()) + 1
        counts = np.zeros((self.n_classes, x.shape[1], self.n_values))  # (C, K, V)
        for c in range(self.n_classes):
            xc = x[y == c]
            for j in range(x.shape[1]):
                counts[c, j] = np.bincount(xc[:, j], minlength=self.n_values)[:self.n_values]
        self.log_lik = np.log(counts + self.smoothing) - np.log(counts.sum(axis=2, keepdims=True)
                                                                + self.smoothing * self.n_values)
        prior = np.bincount(y, minlength=self.n_classes) + self.smoothing
        self.log_prior = np.log(prior / prior.sum())
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.clip(np.asarray(x, dtype=np.int64), 0, self.n_values - 1)
        K = x.shape[1]
        scores = self.log_prior[None, :] + sum(self.log_lik[:, j, x[:, j]].T for j in range(K))  # (N, C)
        return scores.argmax(axis=1)


class XGBoostPaths:
    """XGBoost (Chen et al., 2016; the paper's [17]) multi-class trees through the core API (no scikit-learn).

    Small trees on a handful of categorical entries: 100 rounds, depth 4, eta 0.3, histogram method,
    one thread (shared CPUs). Entries are passed as numbers, as the paper's "vector of 16 entries".
    """

    def __init__(self, seed: int = 0, rounds: int = 100, max_depth: int = 4, eta: float = 0.3):
        try:
            import xgboost
        except ModuleNotFoundError as e:
            raise ImportError("the path classifier 'xgboost' needs XGBoost: pip install xgboost-cpu "
                              "(or pass classifier='naive_bayes', the documented fallback)") from e
        self.xgb = xgboost
        self.rounds = rounds
        self.params = {"max_depth": max_depth, "eta": eta, "tree_method": "hist", "nthread": 1, "seed": seed,
                       "verbosity": 0}

    def fit(self, x: np.ndarray, y: np.ndarray) -> "XGBoostPaths":
        y = np.asarray(y, dtype=np.int64)
        self.n_classes = int(y.max()) + 1
        params = dict(self.params, objective="multi:softprob", num_class=self.n_classes)
        dtrain = self.xgb.DMatrix(np.asarray(x, dtype=np.float32), label=y)
        self.booster = self.xgb.train(params, dtrain, num_boost_round=self.rounds)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        prob = self.booster.predict(self.xgb.DMatrix(np.asarray(x, dtype=np.float32)))  # (N, C)
        return np.asarray(prob).reshape(len(x), self.n_classes).argmax(axis=1)


def _make_classifier(name: str, seed: int):
    if name == "xgboost":
        return XGBoostPaths(seed)
    if name == "naive_bayes":
        return CategoricalNaiveBayes()
    raise ValueError(f"unknown classifier {name!r}; choose 'xgboost' or 'naive_bayes'")


def available_classifier() -> str:
    """'xgboost' when importable, else 'naive_bayes' (the fallback)."""
    try:
        import xgboost  # noqa: F401

        return "xgboost"
    except ModuleNotFoundError:
        return "naive_bayes"


def path_classifier_cv(features: torch.Tensor | np.ndarray, labels: Sequence[Any], *, folds: int = 5,
                       seed: int = 0, classifier: str = "xgboost") -> dict[str, Any]:
    """RAPHAEL Sec. 3.1: classify words from their paths (XGBoost), accuracy by stratified k-fold CV.

    features: (N, K) expert indices (the paths, as the paper: raw entries, no encoding); labels: N
    class labels of any hashable type. Returns {"accuracy_mean", "accuracy_std" (population std over
    folds), "fold_accuracies", "chance" (the majority-class share: what always guessing the largest
    class scores), "n", "n_classes", "folds", "classifier"}.
    """
    x = np.asarray(features.cpu() if isinstance(features, torch.Tensor) else features)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"path_classifier_cv: features must be (N >= 1, K); got shape {x.shape}")
    if len(labels) != x.shape[0]:
        raise ValueError(f"path_classifier_cv: {len(labels)} labels for {x.shape[0]} paths")
    names = sorted(set(labels), key=str)
    if len(names) < 2:
        raise ValueError(f"path_classifier_cv: need >= 2 classes; got {names}")
    y = np.array([names.index(v) for v in labels], dtype=np.int64)
    accs = []
    for test in stratified_folds(y, folds, seed):
        train = np.setdiff1d(np.arange(len(y)), test)
        model = _make_classifier(classifier, seed)
        model.fit(x[train], y[train])  # every class is in every training split (>= k samples per class)
        accs.append(float((np.asarray(model.predict(x[test])).reshape(-1) == y[test]).mean()))
    chance = float(np.bincount(y).max() / len(y))
    return {"accuracy_mean": float(np.mean(accs)), "accuracy_std": float(np.std(accs)), "fold_accuracies": accs,
            "chance": chance, "n": int(len(y)), "n_classes": len(names), "folds": folds, "classifier": classifier}
