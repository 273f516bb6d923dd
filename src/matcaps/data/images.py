"""Reading image files (PNG, JPEG, …) with Pillow into the uint8 arrays that the datasets store.

:func:`read_image` decodes a whole file (so a truncated or corrupted one fails here, with one
line naming it), applies its EXIF orientation and converts it to grey (``L``, ITU-R 601-2
luma) or RGB; :func:`fit_square` resizes it so that its shorter side is the wanted size and
crops the centre square.  An image that already has the wanted size is returned unchanged,
so an image written from a dataset's cache is read back bit for bit.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from matcaps.errors import ConfigError, DataFormatError

#: File name suffixes (lower case) read as images by folder datasets.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")

#: Pillow mode of each supported number of channels: grey or RGB.
CHANNEL_MODES: dict[int, str] = {1: "L", 3: "RGB"}


def check_channels(channels: int) -> str:
    """The Pillow mode for ``channels`` (1 or 3), else :class:`ConfigError`."""
    if channels not in CHANNEL_MODES:
        raise ConfigError(f"images are read as grey (1 channel) or RGB (3 channels), not {channels} channels")
    return CHANNEL_MODES[channels]


def read_image(path: str | Path, channels: int) -> np.ndarray:
    """Decode the image file ``path`` as grey or RGB.

    Args:
        path: A PNG, JPEG or any other file Pillow reads.
        channels: 1 (grey) or 3 (RGB); colour images are converted to grey and grey to RGB.

    Returns:
        ``(H, W)`` uint8 for one channel, ``(H, W, 3)`` uint8 for three.

    Raises:
        DataFormatError: missing, unreadable, truncated or corrupted file, or not an image
            (one line naming the file).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    mode = check_channels(channels)
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()  # decode everything now: damage shows here, not later
                image = ImageOps.exif_transpose(image)
                array = np.asarray(image.convert(mode), dtype=np.uint8)
    except FileNotFoundError:
        raise DataFormatError(f"{path}: no such image file") from None
    except UnidentifiedImageError:
        raise DataFormatError(f"{path}: not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as error:  # fmt: skip
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataFormatError(f"{path}: corrupted or truncated image ({reason})") from None
    return array.copy()


def fit_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize ``image`` so that its shorter side is ``size`` (bilinear), then crop the centre square.

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` uint8.
        size: Side of the output.

    Returns:
        ``(size, size)`` or ``(size, size, C)`` uint8; ``image`` itself if it already has that shape.
    """
    from PIL import Image

    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return image
    scale = size / min(height, width)
    new_height, new_width = max(size, round(height * scale)), max(size, round(width * scale))
    resized = np.array(Image.fromarray(image).resize((new_width, new_height), Image.Resampling.BILINEAR))
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return np.ascontiguousarray(resized[top : top + size, left : left + size])


def load_image(path: str | Path, channels: int, size: int) -> np.ndarray:
    """:func:`read_image` then :func:`fit_square`: ``(size, size[, 3])`` uint8."""
    return fit_square(read_image(path, channels), size)
