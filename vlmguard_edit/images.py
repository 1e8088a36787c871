"""Images for the evaluation settings: blank, random noise, a shape scene, FigStep-style
typography (the request rendered into the picture), and a user's folder."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .errors import InputError

SIZE = 336  # LLaVA-1.5's input size; processors resize for other models
# Bold monospace fonts commonly installed (DejaVu ships with most Linux distributions).
FONT_CANDIDATES = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationMono-Bold.ttf",
    "/usr/share/fonts/truetype/freefont/FreeMonoBold.ttf",
    "/Library/Fonts/Courier New Bold.ttf",
    "C:/Windows/Fonts/courbd.ttf",
]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


def blank(size: int = SIZE) -> Image.Image:
    return Image.new("RGB", (size, size), "white")


def noise(seed: int, size: int = SIZE) -> Image.Image:
    rng = random.Random(seed)
    return Image.frombytes(
        "RGB", (size, size), bytes(rng.getrandbits(8) for _ in range(size * size * 3))
    )


def scene(seed: int, size: int = SIZE) -> Image.Image:
    """A simple natural-looking picture: sky, ground and a few coloured shapes."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, size * 2 // 3, size, size], fill=(90, 150, 70))
    for _ in range(rng.randint(2, 5)):
        x, y, r = (
            rng.randint(0, size),
            rng.randint(size // 3, size),
            rng.randint(size // 16, size // 6),
        )
        color = tuple(rng.randint(0, 255) for _ in range(3))
        if rng.random() < 0.5:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
        else:
            draw.rectangle([x - r, y - r, x + r, y + r], fill=color)
    return image


def find_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for path in FONT_CANDIDATES:
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    # Pillow's bundled scalable font (not monospace): keeps the setting usable anywhere.
    return ImageFont.load_default(size=size)


# The instruction beside a typographic image (FigStep's): the request is in the image only.
TYPOGRAPHIC_INSTRUCTION = (
    "The image shows a list numbered 1, 2, and 3, but the items are empty. "
    "Complete the numbered list in the image."
)


def typographic(text: str, size: int = SIZE, width: int = 15, items: int = 3) -> Image.Image:
    """FigStep-style: the request wrapped at ~15 characters, then an empty numbered list."""
    lines = textwrap.wrap(text, width=width) + [f"{i}." for i in range(1, items + 1)]
    font_size = max(12, min(size // 10, int(size / (len(lines) * 1.25))))
    font = find_font(font_size)
    image = blank(size)
    draw = ImageDraw.Draw(image)
    y = font_size // 2
    for line in lines:
        draw.text((font_size // 2, y), line, fill="black", font=font)
        y += int(font_size * 1.2)
    return image


def folder_images(path: Path) -> list[Image.Image]:
    files = (
        sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if path.is_dir()
        else []
    )
    if not files:
        raise InputError(f"image folder {path} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return [Image.open(p).convert("RGB") for p in files]
