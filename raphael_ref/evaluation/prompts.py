"""Evaluation prompt sets by category and GenEval-style scoring on the synthetic domain.

Not in the paper: RAPHAEL Sec. 4 judges text-image alignment by human raters (ViLG-300) and the
CLIP score. Here the ground truth is programmatic (:mod:`raphael_ref.data.synthetic`), so each
prompt carries the objects it asks for and an image is scored by reading objects back with
:mod:`raphael_ref.evaluation.detector`, as GenEval (Ghosh et al., 2023) does with a detector on
real images: one binary verdict per image, accuracy per category.

Categories (GenEval's names, our shapes are its "classes"; every prompt is written in the
training caption template ``caption_for``, so it names colour, shape and position of each object):

    single_object      "a red circle on the left"            -> a circle is present
    two_objects        two objects of different shapes        -> both shapes present
    counting           "two green triangles on the left ..."  -> exactly N triangles (GenEval rule)
    colors             one object                             -> the shape in the named colour
    position           two objects of different shapes        -> each shape at its named position
    color_attribution  two objects, different shapes/colours  -> each shape in its own colour
                                                                 (a swapped binding fails)

Diagnostic category (not GenEval's, never in the "overall" mean, asked for by name):

    single_position    one object                             -> the shape at its named cell
                                                                 (does the model read position words
                                                                 at all, without binding two objects?)

Extra objects are tolerated except where the count is the question (counting), as in GenEval.

"Held-out": the training generator samples from the same templates and the combinatorial space
is small (3 shapes x 6 colours x 5 positions), so most evaluation prompts also occur as training
captions. Held out here means a *fixed* evaluation set drawn with its own seed (EVAL_SEED, never a
training seed) and scored by the detector, not by the training loss. For a compositional split,
``holdout_pairs`` restricts prompts to ones naming at least one held-out (colour, shape) pair;
training must then drop scenes for which :func:`uses_pair` is true (the data pipeline's job).
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace
from typing import Iterable, Sequence

import numpy as np

from raphael_ref.data.synthetic import COLORS, COUNT_WORDS, POSITIONS, SHAPES, Scene, make_scene
from raphael_ref.evaluation.detector import DetectedObject

__all__ = [
    "ALL_CATEGORIES",
    "BINDING_CATEGORIES",
    "BINDING_OUTCOMES",
    "CATEGORIES",
    "DIAGNOSTIC_CATEGORIES",
    "EVAL_SEED",
    "HELDOUT_PAIRS",
    "PromptSpec",
    "Requirement",
    "SHAPE_ORDER_CATEGORIES",
    "SHAPE_ORDER_OUTCOMES",
    "binding_lines",
    "binding_outcome",
    "binding_summary",
    "evaluation_prompts",
    "match_requirements",
    "named_shapes_drawn",
    "prompt_set",
    "rescore_binding",
    "score",
    "shape_order_lines",
    "shape_order_summary",
    "uses_pair",
]

CATEGORIES: tuple[str, ...] = ("single_object", "two_objects", "counting", "colors", "position", "color_attribution")
DIAGNOSTIC_CATEGORIES: tuple[str, ...] = ("single_position",)  # not in the GenEval-style "overall" mean
ALL_CATEGORIES: tuple[str, ...] = CATEGORIES + DIAGNOSTIC_CATEGORIES
EVAL_SEED = 20230531  # the evaluation set's own seed; training seeds are small integers
# A default compositional split: one pair per shape, colours all different.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (("red", "triangle"), ("green", "circle"), ("blue", "square"))


@dataclasses.dataclass(frozen=True)
class Requirement:
    """One object a prompt asks for; ``None`` fields are not checked."""

    shape: str
    color: str | None = None
    position: str | None = None

    def matches(self, obj: DetectedObject) -> bool:
        return (obj.shape == self.shape and (self.color is None or obj.color == self.color)
                and (self.position is None or obj.position == self.position))


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """A prompt, the scene it describes (renderable ground truth) and what a correct image shows.

    exact_count: the number of detected objects of the required shape must equal the number of
    requirements (counting); otherwise extra objects are tolerated.
    """

    category: str
    index: int
    prompt: str
    scene: Scene
    requirements: tuple[Requirement, ...]
    exact_count: bool = False

    @property
    def uid(self) -> str:
        return f"{self.category}-{self.index:03d}"


def match_requirements(requirements: Sequence[Requirement], objects: Sequence[DetectedObject]) -> list[int] | None:
    """Assign each requirement a distinct matching object (index list), or ``None`` if impossible.

    Depth-first search over assignments: at most 5 requirements and a handful of objects.
    """
    used: list[int] = []

    def search(k: int) -> bool:
        if k == len(requirements):
            return True
        for j, obj in enumerate(objects):
            if j not in used and requirements[k].matches(obj):
                used.append(j)
                if search(k + 1):
                    return True
                used.pop()
        return False

    return list(used) if search(0) else None


def score(spec: PromptSpec, objects: Sequence[DetectedObject]) -> bool:
    """RAPHAEL Sec. 4.1 (image-text alignment), GenEval-style verdict for one image.

    True iff every requirement is met by a distinct detected object and, for counting prompts, the
    number of objects of the required shape equals the number asked for.
    """
    if not isinstance(spec, PromptSpec):
        raise ValueError(f"score expects a PromptSpec; got {type(spec).__name__}")
    if match_requirements(spec.requirements, objects) is None:
        return False
    if spec.exact_count:
        shapes = {r.shape for r in spec.requirements}
        return sum(o.shape in shapes for o in objects) == len(spec.requirements)
    return True


# Two-object categories whose verdict binds an attribute to each shape: the attribute each one binds.
BINDING_CATEGORIES: dict[str, str] = {"position": "position", "color_attribution": "color"}
BINDING_OUTCOMES: tuple[str, ...] = ("bound", "swapped", "one_shape", "other")


def binding_outcome(spec: PromptSpec, objects: Sequence[DetectedObject]) -> str:
    """Why a two-object binding prompt passed or failed (a diagnostic; not in the paper or GenEval).

    For the categories of BINDING_CATEGORIES ("a red circle on the left and a blue square at the top":
    position binds a cell to each shape, color_attribution a colour), the first that holds of:

        "bound"      the verdict of :func:`score` (each shape with its own attribute)
        "swapped"    each shape with the *other* shape's attribute (the words read, the binding exchanged)
        "one_shape"  at most one of the two named shapes is drawn anywhere (the other copies it or is missing)
        "other"      both shapes drawn, neither binding met

    A model that reads both shapes and both attributes but pairs them at random gives as many "swapped" as
    "bound" images: bound / (bound + swapped) is 0.5 by chance and 1 for a model that binds.
    """
    if not isinstance(spec, PromptSpec):
        raise ValueError(f"binding_outcome expects a PromptSpec; got {type(spec).__name__}")
    attr = BINDING_CATEGORIES.get(spec.category)
    if attr is None or len(spec.requirements) != 2:
        raise ValueError(f"binding_outcome: only two-object prompts of {tuple(BINDING_CATEGORIES)} bind an "
                         f"attribute to each shape; got a {spec.category!r} prompt ({spec.prompt!r}).")
    if score(spec, objects):
        return "bound"
    a, b = spec.requirements
    swapped = (dataclasses.replace(a, **{attr: getattr(b, attr)}), dataclasses.replace(b, **{attr: getattr(a, attr)}))
    if match_requirements(swapped, objects) is not None:
        return "swapped"
    drawn = {o.shape for o in objects}
    if a.shape not in drawn or b.shape not in drawn:
        return "one_shape"
    return "other"


def uses_pair(scene: Scene, pairs: Iterable[tuple[str, str]] = HELDOUT_PAIRS) -> bool:
    """Whether the scene contains an object with a (colour, shape) pair in ``pairs`` (a training filter)."""
    pairs = set(pairs)
    return any((o.color, o.shape) in pairs for o in scene.objects)


# ---------------------------------------------------------------------------------------------
# prompt generation
# ---------------------------------------------------------------------------------------------


def _draw_objects(rng: np.random.Generator, category: str, max_count: int) -> list[tuple[str, str, str]]:
    colors = tuple(COLORS)
    if category in ("single_object", "colors", "single_position"):
        n_obj, distinct_shapes, distinct_colors = 1, True, False
    elif category == "counting":
        k = int(rng.integers(2, max_count + 1))
        shape, color = SHAPES[rng.integers(len(SHAPES))], colors[rng.integers(len(colors))]
        pos = [POSITIONS[j] for j in rng.choice(len(POSITIONS), size=k, replace=False)]
        return [(shape, color, p) for p in pos]
    else:
        n_obj, distinct_shapes, distinct_colors = 2, True, category == "color_attribution"
    shapes = [SHAPES[j] for j in rng.choice(len(SHAPES), size=n_obj, replace=not distinct_shapes)]
    cols = [colors[j] for j in rng.choice(len(colors), size=n_obj, replace=not distinct_colors)]
    pos = [POSITIONS[j] for j in rng.choice(len(POSITIONS), size=n_obj, replace=False)]
    return list(zip(shapes, cols, pos))


def _requirements(category: str, objects: Sequence[tuple[str, str, str]]) -> tuple[tuple[Requirement, ...], bool]:
    if category in ("single_object", "two_objects", "counting"):
        return tuple(Requirement(s) for s, _, _ in objects), category == "counting"
    if category in ("colors", "color_attribution"):
        return tuple(Requirement(s, color=c) for s, c, _ in objects), False
    if category in ("position", "single_position"):
        return tuple(Requirement(s, position=p) for s, _, p in objects), False
    raise ValueError(f"unknown category {category!r}; choose from {ALL_CATEGORIES}")


def prompt_set(category: str, n: int, *, seed: int = EVAL_SEED, image_size: int = 32, max_count: int = 3,
               holdout_pairs: Sequence[tuple[str, str]] | None = None) -> list[PromptSpec]:
    """``n`` distinct prompts of one category, a pure function of (category, n, seed, options).

    max_count: largest count in "counting" prompts (2..5; keep it within the training scenes'
    ``max_objects``). holdout_pairs: if given, every prompt names at least one of these
    (colour, shape) pairs (a compositional split; see the module docstring).
    """
    if category not in ALL_CATEGORIES:
        raise ValueError(f"unknown category {category!r}; choose from {ALL_CATEGORIES}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"prompt_set: n must be an int >= 1; got {n!r}")
    if not 2 <= max_count <= max(COUNT_WORDS):
        raise ValueError(f"prompt_set: max_count must lie in [2, {max(COUNT_WORDS)}]; got {max_count}")
    if holdout_pairs is not None:
        bad = [p for p in holdout_pairs if p[0] not in COLORS or p[1] not in SHAPES]
        if bad or not holdout_pairs:
            raise ValueError(f"prompt_set: holdout_pairs must be non-empty (colour, shape) pairs with colours "
                             f"{tuple(COLORS)} and shapes {SHAPES}; got {list(holdout_pairs)!r}")
    rng = np.random.default_rng([seed, ALL_CATEGORIES.index(category)])  # GenEval categories keep their index
    specs: list[PromptSpec] = []
    seen: set[frozenset] = set()
    attempts = 0
    while len(specs) < n:
        attempts += 1
        if attempts > 10_000 + 100 * n:
            raise ValueError(f"prompt_set: could not draw {n} distinct {category} prompts (only {len(specs)} "
                             f"exist under these options); ask for fewer")
        objects = _draw_objects(rng, category, max_count)
        if holdout_pairs is not None and not any((c, s) in set(holdout_pairs) for s, c, _ in objects):
            continue
        key = frozenset(objects)  # the same objects named in another order are the same prompt
        if key in seen:
            continue
        seen.add(key)
        scene = make_scene(objects, image_size)
        reqs, exact = _requirements(category, objects)
        specs.append(PromptSpec(category, len(specs), scene.caption, scene, reqs, exact))
    return specs


def evaluation_prompts(categories: Sequence[str] = CATEGORIES, n_per_category: int = 24, **kwargs) -> dict[str, list[PromptSpec]]:
    """The evaluation set: ``{category: prompt_set(category, n_per_category, **kwargs)}``."""
    unknown = [c for c in categories if c not in ALL_CATEGORIES]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; choose from {ALL_CATEGORIES}")
    return {c: prompt_set(c, n_per_category, **kwargs) for c in categories}


# ---------------------------------------------------------------------------------------------
# binding outcomes of an evaluation's records (tools/evaluate.py, tools/binding_table.py)
# ---------------------------------------------------------------------------------------------


def binding_summary(records: Sequence[dict]) -> dict:
    """Per binding category (prompts.BINDING_CATEGORIES): how many images are bound / swapped / one_shape / other
    (prompts.binding_outcome), and the binding rate bound / (bound + swapped): 0.5 when a model draws both shapes
    with both attributes but pairs them at random, 1 when it binds (NaN when neither occurs)."""
    out = {}
    for cat in BINDING_CATEGORIES:
        recs = [r for r in records if r["category"] == cat and "binding" in r]
        if not recs:
            continue
        counts = {k: sum(r["binding"] == k for r in recs) for k in BINDING_OUTCOMES}
        paired = counts["bound"] + counts["swapped"]
        out[cat] = {**counts, "n": len(recs), "binding_rate": counts["bound"] / paired if paired else float("nan")}
    return out


def _benchmark_specs(records: Sequence[dict], fn: str) -> dict[str, PromptSpec]:
    """uid -> PromptSpec of each record's prompt, from the benchmark's prompt sets (deterministic, and a longer set
    starts with the shorter one: each category's set is drawn once, as long as its largest uid needs). Raises if a
    record's prompt is not the benchmark's (an evaluation with other prompt options)."""
    size: dict[str, int] = {}
    for r in records:
        size[r["category"]] = max(size.get(r["category"], 0), int(r["uid"].rsplit("-", 1)[1]) + 1)
    specs = {s.uid: s for cat, n in size.items() for s in prompt_set(cat, n)}
    for r in records:
        if specs[r["uid"]].prompt != r["prompt"]:
            raise ValueError(f"{fn}: record {r['uid']} reads {r['prompt']!r}, but that prompt is "
                             f"{specs[r['uid']].prompt!r}: an evaluation with other prompt options (--holdout-pairs?)")
    return specs


def _detections(record: dict) -> list[SimpleNamespace]:
    """A record's saved detections as objects with .shape, .color and .position."""
    return [SimpleNamespace(shape=a, color=b, position=c) for a, b, c in record["detected"]]


def rescore_binding(records: Sequence[dict]) -> list[dict]:
    """Records of an evaluation made before "binding" was recorded, with it filled in from their detections
    (uid -> the prompt of the benchmark's prompt sets)."""
    todo = [r for r in records if r["category"] in BINDING_CATEGORIES and "binding" not in r]
    specs = _benchmark_specs(todo, "rescore_binding")
    out = []
    for r in records:
        r = dict(r)
        if r["category"] in BINDING_CATEGORIES and "binding" not in r:
            r["binding"] = binding_outcome(specs[r["uid"]], _detections(r))
        out.append(r)
    return out


# Two-object categories (two distinct shapes named, in caption order) and which of the two shapes an image draws.
SHAPE_ORDER_CATEGORIES: tuple[str, ...] = ("two_objects", "position", "color_attribution")
SHAPE_ORDER_OUTCOMES: tuple[str, ...] = ("both", "first_only", "second_only", "neither")


def named_shapes_drawn(spec: PromptSpec, objects: Sequence[DetectedObject]) -> str:
    """Which of a two-object prompt's two named shapes are drawn anywhere (a diagnostic; not in the paper or GenEval).

    "both", "first_only" (the shape named first in the prompt, e.g. "circle" in "a red circle on the left and a blue
    square at the top"), "second_only" or "neither". It splits binding_outcome's "one_shape" by caption order: a
    model that loses one shape at random gives as many "first_only" as "second_only"; a model whose second object
    copies the first gives "first_only".
    """
    if not isinstance(spec, PromptSpec):
        raise ValueError(f"named_shapes_drawn expects a PromptSpec; got {type(spec).__name__}")
    if spec.category not in SHAPE_ORDER_CATEGORIES or len(spec.requirements) != 2:
        raise ValueError(f"named_shapes_drawn: only the two-object prompts of {SHAPE_ORDER_CATEGORIES} name two "
                         f"shapes; got a {spec.category!r} prompt ({spec.prompt!r}).")
    drawn = {o.shape for o in objects}
    first, second = (r.shape in drawn for r in spec.requirements)
    return SHAPE_ORDER_OUTCOMES[0 if first and second else 1 if first else 2 if second else 3]


def shape_order_summary(records: Sequence[dict], specs: dict[str, PromptSpec] | None = None) -> dict:
    """Per category of SHAPE_ORDER_CATEGORIES in ``records`` (tools/evaluate.py's, with "uid", "prompt" and
    "detected"): counts of :func:`named_shapes_drawn`'s outcomes, and ``first_share`` = first_only / (first_only +
    second_only) with its binomial se (0.5 when the lost shape does not depend on the order; NaN when neither
    occurs). specs: uid -> PromptSpec of the records' prompts; by default the benchmark's prompt sets."""
    records = [r for r in records if r["category"] in SHAPE_ORDER_CATEGORIES]
    if specs is None:
        specs = _benchmark_specs(records, "shape_order_summary")
    out = {}
    for cat in dict.fromkeys(r["category"] for r in records):
        counts = dict.fromkeys(SHAPE_ORDER_OUTCOMES, 0)
        for r in records:
            if r["category"] == cat:
                counts[named_shapes_drawn(specs[r["uid"]], _detections(r))] += 1
        one = counts["first_only"] + counts["second_only"]
        share = counts["first_only"] / one if one else float("nan")
        se = math.sqrt(share * (1 - share) / one) if one else float("nan")
        out[cat] = {**counts, "n": sum(counts.values()), "first_share": share, "first_share_se": se}
    return out


def shape_order_lines(order: dict) -> dict[str, str]:
    """shape_order_summary as one readable line per category (for a results.md)."""
    return {cat: (", ".join(f"{k.replace('_', ' ')} {v[k]}" for k in SHAPE_ORDER_OUTCOMES) + f" of {v['n']}; "
                  f"first only / (first only + second only) {v['first_share']:.2f} (0.5: either shape lost alike)")
            for cat, v in order.items()}


def binding_lines(binding: dict) -> dict[str, str]:
    """binding_summary as one readable line per category (for a results.md)."""
    return {cat: (", ".join(f"{k.replace('_', ' ')} {v[k]}" for k in BINDING_OUTCOMES) + f" of {v['n']}; "
                  f"bound / (bound + swapped) {v['binding_rate']:.2f} (0.5: placed at random)")
            for cat, v in binding.items()}
