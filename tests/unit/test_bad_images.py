"""Bad image inputs end in clear errors or are skipped and counted: decompression bombs, 16-bit, CMYK, alpha and
palette images, awkward CSV manifests (BOM, duplicates, quoting, missing columns) and badly laid out folders."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from transferkit.data import load_image, read_dataset
from transferkit.data.images import as_mode, image_batch, read_csv_manifest, read_image_folder
from transferkit.errors import DataError

WriteImage = Callable[..., Path]


def _bomb(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A 1x1 PNG (a few dozen bytes) whose IHDR chunk claims ``width`` x ``height`` pixels, its CRC fixed."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"  # 8-byte signature, then the first chunk: length, type, 13 bytes, CRC
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def _manifest(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Decompression bombs


def test_a_bomb_is_skipped_and_counted_with_its_claimed_size_and_the_limit(
    tmp_path: Path, write_image: WriteImage
) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    for cls in ("a", "b"):
        write_image(tmp_path / cls / "0.png")
        write_image(tmp_path / cls / "1.png")
    bomb = _bomb(tmp_path / "a" / "bomb.png")
    ds = read_dataset(str(tmp_path), strict=False)
    assert len(ds) == 4 and str(bomb) not in map(str, ds.items)
    assert [s["path"] for s in ds.skipped] == [str(bomb)]
    reason = ds.skipped[0]["reason"]
    assert "100000x100000 pixels" in reason
    assert f"{limit:,} pixels" in reason and "MAX_IMAGE_PIXELS" in reason
    assert "decompression bomb" in reason
    assert Image.MAX_IMAGE_PIXELS == limit  # PIL's global limit is not raised


def test_a_bomb_under_twice_the_limit_is_refused_before_decoding(tmp_path: Path, write_image: WriteImage) -> None:
    """PIL only warns between the limit and twice it, then decodes; here it is refused like a bigger one."""
    write_image(tmp_path / "a" / "0.png")
    write_image(tmp_path / "b" / "0.png")
    bomb = _bomb(tmp_path / "b" / "big.png", 10_000, 10_000)  # 1e8 pixels: over 89.5M, under 179M
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning escapes either
        ds = read_image_folder(tmp_path)
    assert [s["path"] for s in ds.skipped] == [str(bomb)]
    assert "10000x10000 pixels" in ds.skipped[0]["reason"]


def test_a_bomb_with_strict_is_an_error_naming_the_file(tmp_path: Path, write_image: WriteImage) -> None:
    write_image(tmp_path / "a" / "0.png")
    bomb = _bomb(tmp_path / "b" / "bomb.png")
    with pytest.raises(DataError) as info:
        read_dataset(str(tmp_path), strict=True)
    message = str(info.value)
    assert f"image '{bomb}' cannot be read" in message
    assert "100000x100000" in message and "data.strict: false" in message


def test_a_bomb_in_a_csv_manifest_is_skipped(tmp_path: Path, write_image: WriteImage) -> None:
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    write_image(tmp_path / "c.png")
    _bomb(tmp_path / "bomb.png")
    ds = read_dataset(str(_manifest(tmp_path / "m.csv", "path,label\na.png,x\nb.png,y\nc.png,y\nbomb.png,x\n")))
    assert ds.labels.tolist() == [0, 1, 1]
    assert [Path(s["path"]).name for s in ds.skipped] == ["bomb.png"]


def test_predicting_a_bomb_is_a_data_error_without_a_traceback(
    tmp_path: Path, tiny_model: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    import transferkit as tk
    from transferkit.cli import main

    bomb = _bomb(tmp_path / "bomb.png")
    with pytest.raises(DataError, match=f"image '{bomb}' cannot be read.*100000x100000"):
        load_image(bomb)
    folder = tk.save_model(tiny_model(), tmp_path / "m")
    assert main(["predict", str(folder), str(bomb)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: image '{bomb}' cannot be read: too large")
    assert "Replace it with a smaller" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------------
# 16-bit images


def _gradients(tmp_path: Path) -> tuple[Path, Path]:
    """The same horizontal gradient as an 8-bit PNG and as a 16-bit PNG (values spread over 0..65535)."""
    wide = np.tile(np.linspace(0, 65535, 256), (8, 1))
    sixteen = np.rint(wide).astype(np.uint16)
    eight = np.rint(wide / 257).astype(np.uint8)
    Image.fromarray(sixteen).save(tmp_path / "g16.png")
    Image.fromarray(eight).save(tmp_path / "g8.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    return tmp_path / "g16.png", tmp_path / "g8.png"


@pytest.mark.parametrize("channels", [1, 3])
def test_a_16_bit_png_becomes_its_8_bit_version(tmp_path: Path, channels: int) -> None:
    g16, g8 = _gradients(tmp_path)
    got = np.asarray(load_image(g16, channels), dtype=np.int16)
    want = np.asarray(load_image(g8, channels), dtype=np.int16)
    assert got.shape == want.shape == ((8, 256) if channels == 1 else (8, 256, 3))
    assert np.abs(got - want).max() <= 1
    assert (got == 255).mean() < 0.01  # it used to clip: 99.6% of this gradient turned white


def test_16_bit_tiffs_arrays_and_pil_images_of_mode_i(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 10, 257 * 128, 65535]], dtype=np.uint16)
    want = [0, 10, 128, 255]
    Image.fromarray(values).save(tmp_path / "g.tif")
    assert np.asarray(load_image(tmp_path / "g.tif", 1)).ravel().tolist() == want
    assert np.asarray(load_image(values, 1)).ravel().tolist() == want  # a uint16 array
    mode_i = Image.fromarray(values.astype(np.int32))  # older PIL opens 16-bit PNGs as mode I
    assert mode_i.mode == "I"
    assert np.asarray(as_mode(mode_i, "RGB"))[0, :, 0].tolist() == want


def test_image_batch_scales_a_16_bit_pil_image(tiny_model: Callable[..., Any]) -> None:
    model = tiny_model()
    grey = np.full((32, 32), 100, dtype=np.uint8)
    sixteen = Image.fromarray(grey.astype(np.uint16) * 257)
    assert np.allclose(image_batch(model, [sixteen]), image_batch(model, [Image.fromarray(grey)]))


# ---------------------------------------------------------------------------------------------------------------
# CMYK, transparency and palettes: RGBA, LA and transparent palettes are composited on white


def test_a_cmyk_image_loads_as_rgb_and_grey(tmp_path: Path) -> None:
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "red.tif")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "red.jpg", quality=95)
    for path in (tmp_path / "red.tif", tmp_path / "red.jpg"):
        rgb = load_image(path, 3)
        assert rgb.mode == "RGB"
        assert np.abs(np.asarray(rgb, dtype=int)[0, 0] - [255, 0, 0]).max() <= 3
        assert load_image(path, 1).mode == "L"
    assert abs(int(np.asarray(load_image(tmp_path / "red.tif", 1))[0, 0]) - 76) <= 1  # red's luma


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    pixels = np.zeros((2, 2, 4), dtype=np.uint8)  # row 0: transparent black, opaque red; row 1: half-red
    pixels[0, 1] = (255, 0, 0, 255)
    pixels[1, :] = (255, 0, 0, 128)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    rgb = np.asarray(load_image(tmp_path / "a.png", 3), dtype=int)
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == [255, 0, 0]
    assert np.abs(rgb[1, 0] - [255, 127, 127]).max() <= 1
    grey = np.asarray(load_image(tmp_path / "a.png", 1))
    assert grey[0, 0] == 255 and abs(int(grey[0, 1]) - 76) <= 1


def test_la_is_composited_on_white(tmp_path: Path) -> None:
    pixels = np.array([[[0, 0], [40, 255]]], dtype=np.uint8)  # transparent black, opaque dark grey
    Image.fromarray(pixels, mode="LA").save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    assert np.asarray(load_image(tmp_path / "la.png", 1)).tolist() == [[255, 40]]
    assert np.asarray(load_image(tmp_path / "la.png", 3)).tolist() == [[[255] * 3, [40] * 3]]


@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_a_palette_image_with_a_transparent_colour(tmp_path: Path, fmt: str) -> None:
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))  # 0: black (transparent), 1: blue
    im.putpixel((1, 0), 1)
    path = tmp_path / f"p.{fmt}"
    im.save(path, transparency=0)
    assert Image.open(path).mode == "P"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns when a palette with transparency is converted to RGB directly
        rgb = np.asarray(load_image(path, 3)).tolist()
        grey = np.asarray(load_image(path, 1)).tolist()
    assert rgb == [[[255, 255, 255], [0, 0, 255]]]
    assert grey[0][0] == 255 and abs(grey[0][1] - 29) <= 1


def test_an_opaque_palette_image(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert np.asarray(load_image(tmp_path / "p.png", 3))[0, 0].tolist() == [10, 200, 30]


def test_a_folder_of_mixed_modes_reads_and_loads(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.new("RGBA", (8, 8), (1, 2, 3, 0)).save(tmp_path / "a" / "rgba.png")
    Image.new("LA", (8, 8), (5, 9)).save(tmp_path / "a" / "la.png")
    Image.new("CMYK", (8, 8), (1, 2, 3, 4)).save(tmp_path / "b" / "cmyk.jpg")
    Image.new("P", (8, 8), 3).save(tmp_path / "b" / "p.gif")
    Image.fromarray(np.full((8, 8), 4000, dtype=np.uint16)).save(tmp_path / "b" / "i16.png")
    ds = read_dataset(str(tmp_path), strict=True)
    assert len(ds) == 5 and ds.skipped == []
    for item in ds.items:
        assert load_image(item, 3).mode == "RGB" and load_image(item, 1).mode == "L"


# ---------------------------------------------------------------------------------------------------------------
# CSV manifests


def test_a_manifest_with_a_byte_order_mark(tmp_path: Path, write_image: WriteImage) -> None:
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    path = _manifest(tmp_path / "m.csv", "path,label\na.png,x\nb.png,y\n", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbfpath")
    ds = read_csv_manifest(path)
    assert ds.classes == ["x", "y"] and ds.labels.tolist() == [0, 1]


def test_a_manifest_with_spaces_in_its_header(tmp_path: Path, write_image: WriteImage) -> None:
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    ds = read_csv_manifest(_manifest(tmp_path / "m.csv", "path, label\na.png, x\nb.png, y\n"))
    assert ds.classes == ["x", "y"]


def test_a_manifest_that_is_not_utf8(tmp_path: Path, write_image: WriteImage) -> None:
    write_image(tmp_path / "a.png")
    path = tmp_path / "m.csv"
    path.write_bytes("path,label\na.png,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError) as info:
        read_csv_manifest(path)
    assert f"CSV manifest '{path}' is not UTF-8" in str(info.value) and "save it as UTF-8" in str(info.value)


def test_the_same_row_twice_is_refused(tmp_path: Path, write_image: WriteImage) -> None:
    for name in ("a", "b", "c"):
        write_image(tmp_path / f"{name}.png")
    path = _manifest(tmp_path / "m.csv", "path,label\na.png,x\nb.png,y\nc.png,y\nb.png,y\n")
    with pytest.raises(DataError) as info:
        read_dataset(str(path))
    message = str(info.value)
    assert f"CSV manifest '{path}': file '{(tmp_path / 'b.png').resolve()}' is listed 2 times" in message
    assert "lines 3 ('y'), 5 ('y')" in message
    assert "training and the test split" in message and "Keep one row per file" in message


def test_the_same_file_under_two_labels_and_two_spellings_is_refused(tmp_path: Path, write_image: WriteImage) -> None:
    for name in ("a", "b", "c"):
        write_image(tmp_path / "img" / f"{name}.png")
    rows = ["img/c.png,x", "img/a.png,x", "img/b.png,y", f"{tmp_path}/img/a.png,y", "./img/c.png,z"]
    path = _manifest(tmp_path / "m.csv", "\n".join(["path,label", *rows]) + "\n")
    with pytest.raises(DataError) as info:
        read_csv_manifest(path)
    message = str(info.value)  # the first file listed twice (c.png, on line 2) is named, with all its lines
    assert f"file '{(tmp_path / 'img' / 'c.png').resolve()}' is listed 2 times, on lines 2 ('x'), 6 ('z')" in message
    assert "(1 more file(s) are listed more than once)" in message


def test_quoted_paths_with_commas(tmp_path: Path, write_image: WriteImage) -> None:
    write_image(tmp_path / "cats, tabby.png")
    write_image(tmp_path / 'say "hi".png')
    path = _manifest(tmp_path / "m.csv", 'path,label\n"cats, tabby.png","cat, tabby"\n"say ""hi"".png",dog\n')
    ds = read_csv_manifest(path)
    assert [Path(p).name for p in ds.items] == ["cats, tabby.png", 'say "hi".png']
    assert ds.classes == ["cat, tabby", "dog"]


def test_a_missing_label_column_names_the_columns_found(tmp_path: Path) -> None:
    path = _manifest(tmp_path / "m.csv", "path,class\na.png,x\n")
    with pytest.raises(DataError) as info:
        read_csv_manifest(path)
    message = str(info.value)
    assert "found ['path', 'class']; missing 'label'" in message
    assert "make the first line 'path,label' or rename the columns" in message


def test_a_manifest_without_a_header_row(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"found \['a.png', 'x'\]; missing 'path' and 'label'"):
        read_csv_manifest(_manifest(tmp_path / "m.csv", "a.png,x\nb.png,y\n"))


def test_line_numbers_count_blank_lines_and_multiline_fields(tmp_path: Path, write_image: WriteImage) -> None:
    write_image(tmp_path / "a.png")
    path = _manifest(tmp_path / "m.csv", 'path,label\na.png,"two\nlines"\n\nmissing.png,x\n')
    with pytest.raises(FileNotFoundError, match="line 5: file"):
        read_csv_manifest(path)


def test_a_label_whose_images_are_all_unreadable(tmp_path: Path, write_image: WriteImage) -> None:
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    (tmp_path / "c.png").write_bytes(b"garbage")
    path = _manifest(tmp_path / "m.csv", "path,label\na.png,x\nb.png,x\nc.png,y\n")
    with pytest.raises(DataError) as info:
        read_csv_manifest(path)
    message = str(info.value)
    assert f"CSV manifest '{path}': label 'y' has no readable images (all 1 were skipped" in message
    assert f"the first, '{tmp_path / 'c.png'}': UnidentifiedImageError" in message
    assert "replace them or remove the label's rows" in message


# ---------------------------------------------------------------------------------------------------------------
# Folders


def test_an_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        read_dataset(str(tmp_path))
    message = str(info.value)
    assert f"image folder '{tmp_path}' has no class sub-folders (it is empty)" in message
    assert "make one sub-folder per class (at least 2)" in message


def test_a_folder_of_loose_images_says_so(tmp_path: Path, write_image: WriteImage) -> None:
    write_image(tmp_path / "b.png")
    write_image(tmp_path / "a.jpg", fmt="JPEG")
    with pytest.raises(DataError, match=r"it holds 2 image\(s\) directly, e.g. 'a.jpg'"):
        read_dataset(str(tmp_path))


def test_a_class_folder_with_files_of_other_kinds(tmp_path: Path, write_image: WriteImage) -> None:
    write_image(tmp_path / "a" / "0.png")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.heic").write_bytes(b"..")
    (tmp_path / "b" / "notes.txt").write_text("..")
    with pytest.raises(DataError) as info:
        read_dataset(str(tmp_path))
    message = str(info.value)
    assert f"class folder '{tmp_path / 'b'}' has no images" in message
    assert "it holds only .heic, .txt files; add images or remove the folder" in message


def test_a_class_folder_without_a_readable_image_names_the_first_reason(
    tmp_path: Path, write_image: WriteImage
) -> None:
    write_image(tmp_path / "a" / "0.png")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "bad.png").write_bytes(b"not a png")
    _bomb(tmp_path / "b" / "bomb.png")
    with pytest.raises(DataError) as info:
        read_dataset(str(tmp_path), strict=False)
    message = str(info.value)
    assert f"class folder '{tmp_path / 'b'}' has no readable images (all 2 were skipped as unreadable" in message
    assert f"the first, '{tmp_path / 'b' / 'bad.png'}': UnidentifiedImageError" in message
    assert "replace them or remove the folder" in message
