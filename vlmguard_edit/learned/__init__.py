"""The learned edits: the VLM's own text-only behaviour supervises it with images.

VLM-Guard's principle, made permanent: the language model already knows, text only, which
requests to refuse; with an image it forgets. This kind learns a change to the family's last
image-to-language Linear (LLaVA's ``multi_modal_projector.linear_2``, Idefics3's connector,
mllama's projector; ``layout.Family.image_path``) so that

- harmful anchors with an image (blank, noise, scene) are answered as the same model answers
  them text only (teacher: its own greedy text-only answer, teacher-forced; KL per answer
  token), and
- harmless anchors with an image and image-description probes keep the original model's own
  with-image answers (preservation; without it the edit blinds the model).

Text-only behaviour cannot change: no text-only forward passes through the image path.

The second learned kind, ``lowrank``, learns a rank-r update B A of the selected text layers'
attention output projections (the design's own edit site) with the same objective, plus the
original's own text-only answers to the anchors as preservation rows (text-only outputs can
change here, so they are held in place). Fold: W + B A in float32; runtime reference: a hook
adding (x A^T) B^T; file: the factors, ``<key>.lora_A`` (r, in) and ``<key>.lora_B`` (out, r).

Parameters: learned (this module). Plan: that Linear's weight and bias (``plan.py``, kind
"delta"). Fold: W + dW, b + db, in float32, cast once (``fold``). Runtime reference: a forward
hook adding x dW^T + db to the module's output (``hook``). File: safetensors, one delta per
checkpoint key, provenance and the calibration report in its metadata (``Edit``).
"""

from .data import DESCRIBE, Batch, Settings, Teacher, check_same_tokenizer, recombine
from .edit import (
    EDIT_FORMAT,
    FACTORS,
    KIND,
    Edit,
    find_module,
    fold,
    hook,
    hooks,
    memory_names,
    renamed,
)
from .training import PRESERVATION_MAX, READING_MIN, learn, pick, reads, score

__all__ = ["DESCRIBE", "EDIT_FORMAT", "FACTORS", "KIND", "PRESERVATION_MAX", "READING_MIN"]
__all__ += ["Batch", "Edit", "Settings", "Teacher", "check_same_tokenizer", "find_module"]
__all__ += ["fold", "hook", "hooks", "learn", "memory_names", "pick", "reads", "recombine"]
__all__ += ["renamed", "score"]
