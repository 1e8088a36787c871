"""What the learned kinds share: the edit is learned on the VLM itself, supervised by its own
text-only answers (or a base LLM's, --base-llm ID), and shipped as an edit file of deltas or
low-rank factors (learned.Edit) that the fold adds to the planned tensors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..checkpoint import default_device, resolve_model
from ..errors import InputError, PlanError
from ..plan import Plan
from ..public import public_name, scrub
from .base import Context, EditKind, Parameters
from .options import LEARNED

EDIT_NAME = "vlmguard_edit.safetensors"  # a learned edit (learned.Edit)


class LearnedKind(EditKind):
    learned = True
    file_name = EDIT_NAME
    options = LEARNED
    obtained = "learned: vlmguard-edit calibrate VLM --recipe RECIPE -o EDIT (or convert)"
    factored = False  # learns B A at the recipe's rank instead of dense deltas

    @property
    def lora(self) -> bool:  # a factored change is its own LoRA; a dense dW and db is not
        return self.factored

    preserve_text = False  # text-only answers are held to the original's while learning

    def parameters(self, ctx: Context) -> Parameters:
        from ..learned import Edit

        path = ctx.opts.direction_file
        if path and ctx.opts.direction_format != "native":
            raise InputError(
                f"a {self.name} edit file is vlmguard-edit's own format: no --direction-format"
            )
        edit = Edit.load(path) if path else learn_edit(ctx.opts, ctx.source, ctx.plan, self)
        if edit.kind != self.name:
            raise InputError(
                f"the edit file {public_name(str(path))} is a {edit.kind} edit, "
                f"the mode is {self.name}: pass --mode {edit.kind}"
            )
        check_edit_matches(edit, ctx.plan)
        return Parameters(edit, replace(edit, meta=scrub(edit.meta)))

    def load(self, path: Path, plan: Plan) -> Any:
        from ..learned import Edit

        return Edit.load(path)

    def example_fields(self, layers):
        return {"layers": layers, "rank": 2} if self.factored else {}

    def example_parameters(self, plan, path):
        """Random (seeded) deltas of the planned shapes, or low-rank factors B (out, 2) and
        A (2, in) for a factored kind."""
        import torch

        from ..learned import Edit

        generator = torch.Generator().manual_seed(0)
        deltas = {}
        for edit in plan.edits:
            if self.factored:
                out, inp = edit.shape
                deltas[edit.key + ".lora_A"] = 0.3 * torch.randn(2, inp, generator=generator)
                deltas[edit.key + ".lora_B"] = 0.3 * torch.randn(out, 2, generator=generator)
            else:
                deltas[edit.key] = 0.3 * torch.randn(edit.shape, generator=generator)
        Edit(deltas, {"source": "self-test"}, self.name).save(path)
        return path

    def record_fields(self, saved, plan):
        return {"calibration": saved.meta.get("calibration")}

    def fold(self, checkpoint, plan, edit, before, params, prepared):
        from ..learned import fold

        return fold(before, params.delta(edit.key))

    def lora_factors(self, checkpoint, plan, params):
        """A factored edit is its own LoRA (lora_A = A, lora_B = B); a dense one is not."""
        from ..learned import FACTORS

        if not self.factored:
            raise PlanError(
                f"{self.name} learns a dense change dW (and db): not a low-rank update, and a "
                "bias change is not a LoRA either"
            )
        return {
            edit.key.removesuffix(".weight"): tuple(
                params.deltas[edit.key + suffix].float() for suffix in FACTORS
            )
            for edit in plan.edits
        }

    def hooks(self, model, plan, params, checkpoint):
        from ..learned import find_module, hooks, memory_names

        modules = {name: find_module(model, memory_names(name))[1] for name in modules_of(plan)}
        return hooks(modules, params.deltas)

    def card_text(self, record):
        return learned_text(record, self.factored)

    def command_args(self, recipe):
        parts = ["--epochs", str(recipe.epochs), "--learning-rate", f"{recipe.learning_rate:g}"]
        if recipe.search:
            tried = [f"{c['epochs']}:{c['learning_rate']:g}" for c in recipe.search]
            parts += ["--search", ",".join(tried)]
        parts += ["--images", ",".join(recipe.images)]
        if recipe.preserve_images:
            parts += ["--preserve-images", ",".join(recipe.preserve_images)]
        parts += ["--preservation-weight", f"{recipe.preservation_weight:g}"]
        parts += ["--recombine", str(recipe.recombine)] if recipe.recombine else []
        attack = recipe.adversarial
        return parts + (["--adversarial", f"{attack['eps']}:{attack['steps']}"] if attack else [])


def modules_of(plan: Plan) -> list[str]:
    """The checkpoint modules whose weights (and biases) the plan changes."""
    return sorted({edit.key.rsplit(".", 1)[0] for edit in plan.edits})


def check_edit_matches(edit: Any, plan: Plan) -> None:
    """A learned edit must hold exactly the planned tensors, with their shapes."""
    planned = {e.key: tuple(e.shape) for e in plan.edits}
    found = edit.shapes()
    if found != planned:
        raise InputError(
            f"the edit file changes {sorted(found)}, this checkpoint's plan is {sorted(planned)} "
            "(shapes must match too): it was learned for another model"
        )


def learn_edit(opts, source, plan: Plan, kind: LearnedKind):
    """Learn the edit on the source VLM, supervised by its own text-only answers."""
    from ..anchors import load_anchors
    from ..evaluate import Subject
    from ..learned import Edit, learn
    from ..organisms.exact import load_exact_judge

    recipe = opts.recipe
    anchors = load_anchors(recipe.anchors)
    device = default_device(opts.device)
    subject = Subject(source.path, device, opts.dtype)
    teacher, teacher_id = _teacher(opts, subject, device)
    judge = load_exact_judge(source.path)  # an organism: its own image task is preserved too
    deltas, report = learn(
        subject.model,
        subject.processor,
        modules_of(plan),
        list(anchors.harmful),
        list(anchors.harmless),
        _settings(recipe, kind),
        opts.progress,
        teacher,
        judge,
    )
    meta = {
        "teacher": teacher_id,
        "source": source.id,
        "anchors": recipe.anchors,
        "anchors_sha256": anchors.sha256,
        "num_anchor_pairs": len(anchors),
        "calibration": report,
    }
    return Edit({key: d.cpu() for key, d in deltas.items()}, meta, kind.name)


def _settings(recipe, kind: LearnedKind):
    from ..learned import Settings

    return Settings(
        epochs=recipe.epochs,
        learning_rate=recipe.learning_rate,
        images=tuple(recipe.images),
        preserve_images=tuple(recipe.preserve_images),
        batch_size=recipe.batch_size,
        candidates=tuple((c["epochs"], c["learning_rate"]) for c in recipe.search),
        rank=recipe.rank if kind.factored else 0,
        preserve_text=kind.preserve_text,
        preservation_weight=recipe.preservation_weight,
        recombined=recipe.recombine,
        adversarial=_adversarial(recipe.adversarial),
    )


def _adversarial(value: dict[str, int] | None) -> tuple[int, int] | None:
    return None if value is None else (value["eps"], value["steps"])


def _teacher(opts, subject: Any, device: str) -> tuple[Any, str]:
    """The harmful rows' teacher: the base LLM text only (--base-llm ID), or the VLM itself
    without an image (no base LLM, or 'self')."""
    from ..recipe_data import SELF

    base = opts.recipe.base_llm
    if base.id in (None, SELF):
        return None, SELF
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..learned import Teacher, check_same_tokenizer

    llm = resolve_model(base.id, base.revision, opts.allow_pickle)
    tokenizer = AutoTokenizer.from_pretrained(llm.path)
    check_same_tokenizer(subject.processor.tokenizer, tokenizer, base.id)
    dtype = next(subject.model.parameters()).dtype
    model = AutoModelForCausalLM.from_pretrained(llm.path, dtype=dtype).to(device).eval()
    return Teacher(model, tokenizer, base.template), llm.id


def factored_what(where: str, recipe: dict[str, Any]) -> str:
    """The card's sentence for a factored edit of ``where`` that held text-only answers."""
    return (
        f"Only {where} changed, each by a rank-{recipe['rank']} product B A; text-only answers "
        "were held to the original's own while it was learned (they can move slightly: see "
        "the held-out numbers below)."
    )


def learned_text(record: dict[str, Any], lowrank: bool) -> tuple[str, str]:
    """(what, how) of a learned edit; ``lowrank``: B A of o_proj, else the image path."""
    recipe, direction = record["recipe"], record["direction"]
    modules = list(dict.fromkeys(edit["module"] for edit in record["edits"]))
    module = ", ".join(f"`{m}`" for m in modules)
    what = (
        factored_what(f"the attention output projections of {len(modules)} text layers", recipe)
        if lowrank
        else f"Only {module} changed (the image-to-language path, which a text-only prompt "
        "never reaches), so the edit acts only when an image is in the prompt: text-only "
        "behaviour is exactly the original's."
    )
    report = direction.get("calibration") or {}
    before, after = report.get("before") or {}, report.get("after") or {}
    change = "B A of those projections" if lowrank else f"dW, db of {module}"
    epochs = after.get("epochs", recipe["epochs"])  # the calibrated candidate's, with a search
    rate = after.get("learning_rate", recipe["learning_rate"])
    images = (report.get("settings") or {}).get("images", recipe["images"])  # after the gate
    how = (
        f"A change {change} was learned ({epochs} epochs, Adam {rate:g}) so that, with an "
        f"image ({', '.join(images)}), "
        f"the model answers {direction['num_anchor_pairs']} harmful anchor prompts as it does "
        "text only (its own text-only answers are the teacher: the language model supervises "
        "the VLM), while harmless prompts and image descriptions keep the original's "
        "with-image answers"
        + (" and text-only answers" if lowrank else "")
        + ". The weights became\n\n"
        f"    {record['map']}\n"
    )
    if after:
        how += (
            "\nOn held-out anchors (teacher-forced; every candidate in `calibration.md`): "
            "first answer token agreeing with the "
            f"text-only answer {before.get('harmful_first_token_agreement', 0):.0%} -> "
            f"{after['harmful_first_token_agreement']:.0%}; KL to the original on harmless "
            f"and description prompts {after['preservation_kl']:.3f}.\n"
        )
    return what, how
