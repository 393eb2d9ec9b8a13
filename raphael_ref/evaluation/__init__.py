"""Evaluation of text-image alignment and image quality (RAPHAEL Sec. 4; GenEval-style on synthetic data).

    detector         read objects (colour, shape, position, count) back from a synthetic-domain image
    prompts          fixed evaluation prompt sets by category and their GenEval-style scoring
    metrics          FID/KID (torch-fidelity) and CLIP score (open_clip), local weights only
    attention_views  per-token masks and pooled-token maps over generated images, as PNG

``tools/evaluate.py`` runs the benchmark for a checkpoint.
"""

from raphael_ref.evaluation.detector import DetectedObject, DetectorConfig, detect, detect_batch, to_uint8
from raphael_ref.evaluation.prompts import CATEGORIES, PromptSpec, Requirement, evaluation_prompts, prompt_set, score

__all__ = [
    "CATEGORIES", "DetectedObject", "DetectorConfig", "PromptSpec", "Requirement", "detect", "detect_batch",
    "evaluation_prompts", "prompt_set", "score", "to_uint8",
]
