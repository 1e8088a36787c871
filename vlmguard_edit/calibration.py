"""The calibration report of a learned edit: every candidate's held-out scores, as a table
(``calibration.md``) and a chart (``calibration.png``), written beside the guarded weights.

The numbers are the ones ``learned.learn`` recorded (teacher-forced, on the 20% of the
anchors held out from fitting); the chosen candidate is the one ``learned.pick`` kept.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from .learned import PRESERVATION_MAX, READING_MIN
from .writes import replace_file

FILES = ("calibration.md", "calibration.png")
_AGREE, _HARM, _KEEP = (
    "harmful_first_token_agreement",
    "harmful_kl_to_text_only",
    "preservation_kl",
)
_KEPT = "preservation_first_token_agreement"


def rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any], bool]]:
    """(label, scores, chosen) for the unedited model and each candidate tried."""
    tried = report.get("candidates") or [report["after"]]
    out = [("unedited", report["before"], False)]
    for row in tried:
        label = f"{row['epochs']} epochs, lr {row['learning_rate']:g}"
        out.append((label, row, row == report["after"]))
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Calibration",
        "",
        "Held-out anchors, teacher-forced (one forward per prompt). The rule: the highest "
        f"agreement whose preservation KL is at most {PRESERVATION_MAX} (ties: the lower "
        "preservation KL), else the lowest preservation KL.",
        "",
        "| candidate | first answer token as text only | KL to the text-only answer "
        "| preservation KL | preserved first answer token | chosen |",
        "|---|---|---|---|---|---|",
    ]
    for label, r, chosen in rows(report):
        kept = r.get(_KEPT)  # absent from reports written before it was measured
        lines.append(
            f"| {label} | {r[_AGREE]:.0%} | {r[_HARM]:.4f} | {r[_KEEP]:.4f} "
            f"| {'-' if kept is None else f'{kept:.0%}'} | {'yes' if chosen else ''} |"
        )
    lines += ["", *reading_lines(report.get("reading")), "![calibration](calibration.png)", ""]
    return "\n".join(lines)


def reading_lines(reading: dict[str, Any] | None) -> list[str]:
    """What the reading gate measured and decided, if it ran
    (``learned.training._reading_gate``)."""
    if reading is None:
        return []
    verdict = (
        "harmful renders were taught to be refused"
        if reading["taught"]
        else f"below {READING_MIN:.0%}: renders were kept as preservation rows only (a model "
        "that cannot read would learn to refuse every render)"
    )
    return [
        f"Reading: {reading['share']:.0%} of harmless anchors rendered into the image were "
        f"answered as written; {verdict}.",
        "",
    ]


def chart(report: dict[str, Any]) -> bytes:
    """Per candidate: agreement (0-100%) and preservation KL (0 to twice the bound), with
    the bound drawn; the chosen candidate's label is marked."""
    from PIL import Image, ImageDraw

    from .images import find_font

    entries = rows(report)
    width, height, left, bottom, top = 120 + 150 * len(entries), 320, 60, 70, 40
    image = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(image), find_font(12)
    draw.text((left, 10), "held-out agreement (blue), preservation KL (orange)", "black", font)
    plot = height - bottom - top
    bound_y = height - bottom - plot / 2  # the KL axis spans 0 .. 2 x the bound
    draw.text((10, top - 7), "100%", "black", font)  # the agreement axis
    draw.text((10, height - bottom - 7), "0", "black", font)
    draw.line([left, bound_y, width - 20, bound_y], fill=(220, 120, 40))
    draw.text((width - 110, bound_y - 16), f"KL {PRESERVATION_MAX}", "black", font)
    for i, (label, r, chosen) in enumerate(entries):
        x0 = left + 20 + 150 * i
        keep = min(r[_KEEP] / (2 * PRESERVATION_MAX), 1.0)
        for j, (value, colour) in enumerate(((r[_AGREE], (70, 130, 180)), (keep, (220, 120, 40)))):
            y = height - bottom - plot * value
            draw.rectangle([x0 + 45 * j, y, x0 + 45 * j + 40, height - bottom], fill=colour)
        mark = "* " if chosen else ""
        draw.text((x0, height - bottom + 8), mark + label, "black", font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write(report: dict[str, Any], folder: Path) -> tuple[str, ...]:
    """calibration.md and calibration.png in ``folder`` (each written beside and renamed)."""
    replace_file(folder / FILES[0], markdown(report))
    replace_file(folder / FILES[1], chart(report))
    return FILES
