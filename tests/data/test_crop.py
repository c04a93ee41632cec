"""Crop geometry and the image decoder, on synthetic images with a known coloured box."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from finegrained.data import imageio
from finegrained.data.crop import (PAD_VALUE, Layout, crop_window, jpeg_draft_factor,
                                   letterbox_geometry, padded_pixels, squeeze_limit)
from finegrained.data.imageio import decode_crop, load_crop
from finegrained.errors import DataError

RED, BLUE = (230, 20, 20), (20, 20, 230)


def box_image(size=(400, 300), box=(100, 50, 120, 160), colour=RED, background=BLUE):
    """An RGB image of ``background`` with ``box`` (x, y, w, h) filled with ``colour``."""
    im = Image.new("RGB", size, background)
    x, y, w, h = box
    im.paste(colour, (x, y, x + w, y + h))
    return im


def fraction_of(pixels, colour, tol=40):
    return float((np.abs(pixels.astype(int) - colour).max(axis=-1) < tol).mean())


# --------------------------------------------------------------------------- geometry


def test_window_margin_zero_is_the_box():
    assert crop_window((10, 20, 30, 40), (100, 100), 0.0, "keep") == (10, 20, 40, 60)


def test_window_margin_adds_fraction_each_side():
    # 100 x 50 box, margin 0.1 -> 10 px left/right, 5 px top/bottom.
    assert crop_window((100, 100, 100, 50), (400, 400), 0.1, "keep") == (90, 95, 210, 155)


def test_square_window_centred_on_box():
    left, top, right, bottom = crop_window((100, 100, 100, 50), (400, 400), 0.0, "square")
    assert (right - left, bottom - top) == (100, 100)
    assert (left + right) / 2 == 150 and (top + bottom) / 2 == 125


def test_square_window_shifted_inside_image():
    # A box at the right edge: the square keeps its side and moves left, not past the border.
    assert crop_window((350, 10, 50, 20), (400, 300), 0.5, "square") == (300, 0, 400, 100)


def test_square_longer_than_short_side_gives_up_context_not_pixels():
    # Box 250 px, margined square 325 px, photo 400x300: the square shrinks to 300 px and
    # still holds the whole box (it was clamped to 325x300 and letterboxed before).
    window = crop_window((50, 20, 250, 250), (400, 300), 0.15, "square")
    assert window == (25, 0, 325, 300)
    assert letterbox_geometry((window[2] - window[0], window[3] - window[1]), 256) \
        == Layout(0, 0, 256, 256)


def test_box_longer_than_short_side_spans_short_side_and_box():
    # A 350 px wide box in a 400x300 photo: no square inside the photo holds it.
    assert crop_window((20, 10, 350, 200), (400, 300), 0.15, "square") == (20, 0, 370, 300)
    assert crop_window((10, 10, 80, 30), (100, 50), 0.5, "square") == (10, 0, 90, 50)
    assert crop_window((10, 20, 30, 80), (50, 100), 0.5, "square") == (0, 20, 50, 100)


def test_overflow_pad_or_squeeze_up_to_the_limit():
    assert letterbox_geometry((350, 300), 256) == Layout(0, 18, 256, 219)     # pad
    assert letterbox_geometry((350, 300), 256, 1.333) == Layout(0, 0, 256, 256)
    assert letterbox_geometry((300, 600), 256, 1.5) == Layout(32, 0, 192, 256)  # squeeze + pad
    assert squeeze_limit("square", "pad", 1.5) == 1.0
    assert squeeze_limit("keep", "squeeze", 1.5) == 1.0
    assert squeeze_limit("square", "squeeze", 1.5) == 1.5


def _nabirds_geometry(annotations):
    def read(name):
        return {line.split()[0]: tuple(int(v) for v in line.split()[1:])
                for line in (annotations / name).read_text().splitlines()}
    sizes, boxes = read("sizes.txt"), read("bounding_boxes.txt")
    return [(sizes[k], boxes[k]) for k in sizes]


def test_real_nabirds_geometry_padding_and_windows(nabirds_annotations):
    """All 48,562 NABirds windows at S=256, margin 0.15: inside the photo, holding the box,
    square whenever the box fits the short side; padding only for the rest."""
    size, padded, padded_pixels_total, unsquare = 256, 0, 0, 0
    geometry = _nabirds_geometry(nabirds_annotations)
    for (w, h), (x, y, bw, bh) in geometry:
        left, top, right, bottom = crop_window((x, y, bw, bh), (w, h), 0.15, "square")
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
        assert left <= max(x, 0) and top <= max(y, 0)
        assert right >= min(x + bw, w) and bottom >= min(y + bh, h)
        if max(min(x + bw, w) - max(x, 0), min(y + bh, h) - max(y, 0)) <= min(w, h):
            assert right - left == bottom - top
        else:
            unsquare += 1
        layout = letterbox_geometry((right - left, bottom - top), size)
        padded += padded_pixels(layout, size) > 0
        padded_pixels_total += padded_pixels(layout, size)
    n = len(geometry)
    assert n == 48562
    # Before issue #9: 22,787 crops (46.9 %) and 8.1 % of the pixels were padding.
    assert padded / n < 0.17 and padded_pixels_total / (n * size * size) < 0.021
    assert unsquare < 0.17 * n


def test_box_partly_outside_is_clamped():
    assert crop_window((-20, 80, 70, 40), (100, 100), 0.0, "keep") == (0, 80, 50, 100)


@pytest.mark.parametrize("box", [(10, 10, 0, 5), (10, 10, 5, -1), (200, 10, 5, 5),
                                 (-10, 10, 10, 5)])
def test_degenerate_boxes_raise(box):
    with pytest.raises(DataError, match="img.jpg"):
        crop_window(box, (100, 100), 0.1, "square", source="img.jpg")


@pytest.mark.parametrize("margin", [0.15, 0.5, 2.0])
def test_a_box_far_outside_the_photo_is_a_data_error_at_any_margin(margin):
    """``1 1 1e308 1e308`` used to be clamped at the default margin and to overflow at 0.5."""
    with pytest.raises(DataError, match="by more than 25% of its side") as caught:
        crop_window((1, 1, 1e308, 1e308), (100, 80), margin, "square", source="img.jpg")
    assert caught.value.path == "img.jpg"
    # Real boxes stick out too (NABirds: up to 21.6 % of the side): clamped, not refused.
    assert crop_window((221, 28, 1024, 683), (1024, 683), margin, "keep")[2] == 1024


def test_letterbox_geometry():
    assert letterbox_geometry((200, 100), 64) == Layout(x=0, y=16, w=64, h=32)
    assert letterbox_geometry((50, 50), 64) == Layout(0, 0, 64, 64)


# --------------------------------------------------------------------------- decoding


def test_margin_zero_crop_is_all_box_colour(tmp_path):
    path = tmp_path / "a.png"
    box_image().save(path)
    out = load_crop(path, (100, 50, 120, 160), 64, 0.0, "keep")
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    # 'keep' on a 120x160 box letterboxes: 48 columns of box colour, 8 of grey each side.
    assert fraction_of(out[:, 10:-10], RED) > 0.99
    assert (out[:, :7] == PAD_VALUE).all() and (out[:, -7:] == PAD_VALUE).all()


def test_margin_shows_background_in_proportion(tmp_path):
    path = tmp_path / "a.png"
    box_image(box=(100, 50, 100, 100)).save(path)
    out = load_crop(path, (100, 50, 100, 100), 100, 0.25, "square")
    # The window is 150 px: the box fills the middle 2/3 of each axis, 1/6 background each side.
    assert abs(fraction_of(out, RED) - (2 / 3) ** 2) < 0.02
    assert fraction_of(out[:, :15], BLUE) > 0.95 and fraction_of(out[:15], BLUE) > 0.95


def test_square_vs_keep_on_wide_box(tmp_path):
    path = tmp_path / "a.png"
    box_image(size=(400, 300), box=(100, 100, 200, 50)).save(path)
    square = load_crop(path, (100, 100, 200, 50), 80, 0.0, "square")
    keep = load_crop(path, (100, 100, 200, 50), 80, 0.0, "keep")
    # square: a 200x200 window, the box a band 1/4 high between background;
    # keep: the box alone, letterboxed to 80x20 between grey bars.
    assert abs(fraction_of(square, RED) - 0.25) < 0.02
    assert abs(fraction_of(square, BLUE) - 0.75) < 0.02
    assert abs(fraction_of(keep, RED) - 0.25) < 0.02 and fraction_of(keep, BLUE) < 0.01
    assert (keep[:29] == PAD_VALUE).all() and (keep[-29:] == PAD_VALUE).all()


def test_box_partly_outside_image(tmp_path):
    path = tmp_path / "a.png"
    box_image(size=(200, 200), box=(150, 0, 50, 100)).save(path)
    out = load_crop(path, (150, -40, 90, 140), 50, 0.0, "keep")  # clamped to (150,0)-(200,100)
    assert fraction_of(out[:, 15:-15], RED) > 0.99


def test_exif_orientation_applied_to_crop(tmp_path):
    # Stored 200x100: left half red, right half blue. Orientation 6 means the viewer rotates it
    # 90 degrees clockwise, so the displayed crop has red on top and blue at the bottom.
    stored = Image.new("RGB", (200, 100), BLUE)
    stored.paste(RED, (0, 0, 100, 100))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, quality=95, exif=exif)
    out = load_crop(path, (0, 0, 200, 100), 64, 0.0, "keep", image_wh=(200, 100))
    # Displayed crop is 100x200 -> letterboxed to 32x64 in columns 16..47.
    assert fraction_of(out[:28, 18:46], RED) > 0.99
    assert fraction_of(out[36:, 18:46], BLUE) > 0.99
    assert (out[:, :15] == PAD_VALUE).all() and (out[:, 49:] == PAD_VALUE).all()


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "RGBA", "LA", "I;16"])
def test_any_mode_gives_rgb(tmp_path, mode):
    # 204 is in Pillow's web palette, so 'P' holds it exactly instead of dithering.
    rgb = Image.new("RGB", (60, 60), (204, 204, 204))
    if mode == "I;16":
        im = Image.fromarray(np.full((60, 60), 204 * 257, np.uint16))
        assert im.mode == "I;16"
    else:
        im = rgb.convert(mode)
    path = tmp_path / f"img.{'jpg' if mode == 'CMYK' else 'png'}"
    im.save(path)
    out = load_crop(path, None, 32, 0.0, "square")
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - 204).max() <= 3


def test_transparent_pixels_become_grey(tmp_path):
    im = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    path = tmp_path / "clear.png"
    im.save(path)
    assert (load_crop(path, None, 8, 0.0, "square") == PAD_VALUE).all()


def test_png_named_jpg_decodes(tmp_path):
    path = tmp_path / "actually_png.jpg"
    box_image().save(path, format="PNG")
    out = load_crop(path, (100, 50, 120, 160), 32, 0.0, "square")
    assert fraction_of(out[:, 10:-10], RED) > 0.99


def _big_jpeg(path, colour=None):
    if colour is not None:
        Image.new("RGB", (2400, 1600), colour).save(path, quality=92)
        return path
    rng = np.random.default_rng(0)
    # Smooth texture (upsampled noise) so the comparison measures resampling, not JPEG noise.
    small = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(small).resize((2400, 1600), Image.Resampling.BICUBIC).save(path, quality=92)
    return path


def _record_scales(monkeypatch):
    scales = []
    original = imageio._draft_scale
    monkeypatch.setattr(imageio, "_draft_scale",
                        lambda *a: scales.append(original(*a)) or scales[-1])
    return scales


@pytest.mark.parametrize("box, margin, factor", [
    ((600, 300, 1200, 1000), 0.1, 8),     # a 1320 px window into 128 px: decoded at 1/8
    ((3, 4, 1000, 1000), 0.0, 4),         # window (3, 4, 1003, 1004): not on the 1/4 grid
])
def test_draft_mode_on_big_jpeg_matches_full_decode(tmp_path, monkeypatch, box, margin, factor):
    path = _big_jpeg(tmp_path / "big.jpg")
    scales = _record_scales(monkeypatch)
    drafted = load_crop(path, box, 128, margin, "square")
    assert scales == [factor]
    with Image.open(path) as im:
        im.load()
        window = crop_window(box, im.size, margin, "square")
        full = np.asarray(im.crop(window).resize((128, 128), Image.Resampling.LANCZOS))
    assert jpeg_draft_factor(im.size, (window[2] - window[0], window[3] - window[1]), 128) \
        == factor
    # Rounding the scaled window's edges apart made a 251x250 region here (error 9.0).
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 1.0


def test_draft_mode_keeps_a_square_window_square(tmp_path, monkeypatch):
    """No one-pixel grey stripe: the scaled window of a square stays square."""
    path = _big_jpeg(tmp_path / "solid.jpg", colour=(200, 60, 40))
    scales = _record_scales(monkeypatch)
    crop = decode_crop(path, (3, 4, 1000, 1000), 128, 0.0, "square")
    assert scales == [4] and crop.content == Layout(0, 0, 128, 128)
    assert np.abs(crop.pixels.astype(int) - (200, 60, 40)).max() <= 3


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_a_multi_frame_file_is_refused_whatever_its_name(tmp_path, fmt):
    path = tmp_path / "bird.jpg"
    frames = [box_image(), box_image(colour=BLUE, background=RED)]
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:])
    with pytest.raises(DataError, match=f"{fmt} file with 2 frames") as caught:
        decode_crop(path, None, 32, 0.0, "square")
    assert caught.value.path == str(path)
    frames[0].save(path, format=fmt)          # one frame: a photo like any other
    assert decode_crop(path, None, 32, 0.0, "square").pixels.shape == (32, 32, 3)


def test_image_size_mismatch_raises(tmp_path):
    path = tmp_path / "a.png"
    box_image().save(path)
    with pytest.raises(DataError, match="differs"):
        load_crop(path, (0, 0, 10, 10), 16, 0.0, "square", image_wh=(300, 400))


def test_missing_truncated_and_garbage_files_raise(tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(DataError, match="missing.jpg"):
        load_crop(missing, None, 16, 0.0, "square")

    rng = np.random.default_rng(1)
    full = tmp_path / "full.jpg"
    Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(full, quality=90)
    data = full.read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated.jpg"):
        load_crop(truncated, None, 16, 0.0, "square")

    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="garbage.jpg"):
        load_crop(garbage, None, 16, 0.0, "square")


@pytest.mark.parametrize("overflow, content", [("pad", Layout(0, 4, 64, 55)),
                                               ("squeeze", Layout(0, 0, 64, 64))])
def test_decode_crop_reports_content_and_pads_only_outside(tmp_path, overflow, content):
    path = tmp_path / "wide.png"
    box = (20, 10, 350, 200)          # longer than the photo's 300 px short side
    box_image(size=(400, 300), box=box).save(path)
    crop = decode_crop(path, box, 64, 0.15, "square", overflow=overflow, max_squeeze=1.333)
    assert crop.content == content
    x, y, w, h = content
    inside = np.zeros((64, 64), bool)
    inside[y:y + h, x:x + w] = True
    assert (crop.pixels[~inside] == PAD_VALUE).all()
    assert not (crop.pixels[inside] == PAD_VALUE).all(axis=-1).any()
