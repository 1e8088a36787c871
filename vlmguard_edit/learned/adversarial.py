"""Adversarial calibration: the learned edit also trains on images crafted against itself.

Each harmful anchor batch gets a perturbation of a blank image (attack.Perturbation: PGD on
raw pixels, L-inf eps, aimed at the compliance prefix) that is re-optimised against the
edit being learned at the start of every epoch, a few steps at a time from where it stopped
(after 20 epochs of 10 steps it has had eval's 200). The refusal rows keep their text-only
teacher: whatever the pixels, the answer is the one the LLM gives without an image. Each
harmful batch's perturbed images are also shown to its paired harmless anchors (the same
pairs, in the same order: learned.data._split shuffles both alike), held to the original's
answer on a blank image, so that the edit cannot learn "a perturbed image means refuse".
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..attack import Budget, Perturbation
from .data import Batch, Settings, _batches


@dataclass
class Adversarial:
    """The adversarial rows of one training run and the perturbations their pixels come
    from (``pairs``: batch index -> perturbation index)."""

    batches: list[Batch]
    perturbations: list[Perturbation]
    pairs: list[int]
    steps: int

    def restart(self) -> None:
        """Blank images again: every training run attacks its own edit from the start."""
        for perturbation in self.perturbations:
            perturbation.delta.zero_()
        self._show()

    def refresh(self, model: torch.nn.Module) -> None:
        """``steps`` more PGD steps against the model as it is now (its edit's hooks on)."""
        for perturbation in self.perturbations:
            perturbation.optimise(model, self.steps)
        self._show()

    def _show(self) -> None:
        for batch, index in zip(self.batches, self.pairs, strict=True):
            batch.inputs["pixel_values"] = self.perturbations[index].pixel_values()


@torch.no_grad()
def adversarial_rows(
    model, processor, harmful: list[str], harmless: list[str], settings: Settings, teacher, target
) -> Adversarial:
    """The harmful anchors on blank images (to the text-only answer) and the paired harmless
    ones (to the original's blank-image answer), with one perturbation per harmful batch."""
    eps, steps = settings.adversarial
    blank = replace(settings, images=("blank",), preserve_images=())
    refusal = _batches(model, processor, harmful, [], [], blank, teacher)
    kept = _batches(model, processor, [], harmless, [], blank)
    size = settings.batch_size
    chunks = [harmful[i : i + size] for i in range(0, len(harmful), size)]
    perturbations = [Perturbation(model, processor, c, target, Budget(eps)) for c in chunks]
    shown = [(b, i) for i, b in enumerate(kept) if _fits(b, chunks, i)]
    batches = refusal + [b for b, _ in shown]
    pairs = list(range(len(refusal))) + [i for _, i in shown]
    return Adversarial(batches, perturbations, pairs, steps)


def _fits(batch: Batch, chunks: list[list[str]], index: int) -> bool:
    """A harmless batch shows harmful batch ``index``'s images when there is one of its size."""
    return index < len(chunks) and len(chunks[index]) == batch.inputs["input_ids"].shape[0]
