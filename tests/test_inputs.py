"""engine.inputs: the one reader of input files. The same file gives the same samples to
`bigmodel predict` and `bigmodel explain`, whatever its format; a flat vector fits an image model
and the shape it was read as is shown; bad files are one `error:` line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import assert_one_error_line

from bigmodel_cli.engine.inputs import read_inputs
from bigmodel_cli.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIGITS = {"name": "digits", "input_shape": [1, 8, 8]}


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    """One digit (raw 0–16 units) saved as PNG, RGB PNG, PGM (binary and text), .npy (8×8 and
    flat), .npz, .csv and .txt: every file holds exactly the same values."""
    from PIL import Image

    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    ink = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
    raw = ink.astype(np.float32) / 255.0 * np.float32(16)  # what a white pixel of 16 makes of the image
    Image.fromarray(ink, mode="L").save(root / "grey.png")
    Image.fromarray(np.stack([ink] * 3, axis=-1), mode="RGB").save(root / "rgb.png")
    (root / "binary.pgm").write_bytes(b"P5\n# a digit\n8 8\n255\n" + ink.tobytes())
    (root / "text.pgm").write_text("P2\n8 8\n255\n" + "\n".join(" ".join(map(str, r)) for r in ink) + "\n")
    np.save(root / "image.npy", raw)
    np.save(root / "flat.npy", raw.reshape(-1))
    np.savez(root / "arrays.npz", x=raw[None])
    np.savetxt(root / "row.csv", raw.reshape(1, -1), fmt="%.9g", delimiter=",",
               header=",".join(f"p{i}" for i in range(64)), comments="")
    np.savetxt(root / "rows.txt", raw, fmt="%.9g", header="eight rows of eight pixels")
    return root, raw


def test_every_format_gives_the_same_samples(digit_files):
    root, raw = digit_files
    expected = raw.reshape(1, 1, 8, 8)
    read_as = {"grey.png": (8, 8), "binary.pgm": (8, 8), "text.pgm": (8, 8), "image.npy": (8, 8), "flat.npy": (64,),
               "arrays.npz": (1, 8, 8), "row.csv": (1, 64), "rows.txt": (8, 8)}
    for name, shape in read_as.items():
        inputs = read_inputs(root / name, DIGITS)
        assert inputs.samples.dtype == np.float32 and inputs.read_as == shape, name
        np.testing.assert_array_equal(inputs.samples, expected, err_msg=name)
    rgb = read_inputs(root / "rgb.png", DIGITS)  # luma of three equal channels: the grey value (to rounding)
    assert rgb.read_as == (8, 8, 3)
    np.testing.assert_allclose(rgb.samples, expected, rtol=1e-6)
    assert read_inputs(root / "grey.png", {"name": "mine", "input_shape": [1, 8, 8]}).samples.max() > 16  # 255 scale
    np.testing.assert_array_equal(read_inputs(root / "grey.png", DIGITS, pixel_max=32).samples, expected * 2)
    with pytest.raises(UserError, match="--pixel-max must be a finite positive number"):
        read_inputs(root / "grey.png", DIGITS, pixel_max=float("inf"))


@pytest.mark.parametrize("name", ["grey.png", "flat.npy", "row.csv", "rows.txt", "binary.pgm"])
def test_predict_and_explain_read_a_file_alike(cli, digit_files, digits_mlp, name):
    root, _ = digit_files
    path = root / name
    samples = read_inputs(path, DIGITS).samples
    predicted = cli("predict", digits_mlp, path, "--backend", "torch", "--json")
    explained = cli("explain", digits_mlp, path, "--method", "saliency", "--json")
    assert predicted.exit_code == 0 and explained.exit_code == 0, predicted.output + explained.output
    p, e = json.loads(predicted.stdout), json.loads(explained.stdout)
    np.testing.assert_array_equal(np.asarray(e["input"], dtype=np.float32), samples[0])
    assert p["read_as"] == e["read_as"] == list(read_inputs(path, DIGITS).read_as)
    assert p["input_shape"] == e["input_shape"] == [1, 8, 8] and p["samples"] == 1
    assert p["predictions"][0]["class_index"] == e["prediction"]
    assert p["predictions"][0]["probability"] == pytest.approx(e["target_probability"], abs=1e-5)


def test_a_flat_vector_fits_an_image_model_and_the_tables_say_how(cli, digit_files, digits_mlp):
    root, _ = digit_files
    predicted = cli("predict", digits_mlp, root / "flat.npy")
    assert predicted.exit_code == 0, predicted.output
    assert "read 64 as 1 sample of 1×8×8" in predicted.stdout
    explained = cli("explain", digits_mlp, root / "flat.npy", "--method", "saliency")
    assert explained.exit_code == 0, explained.output
    assert "input read as" in explained.stdout and "64 → 1×8×8" in explained.stdout
    batch = root / "batch.npy"
    np.save(batch, np.zeros((3, 64), dtype=np.float32))
    assert "read 3×64 as 3 samples of 1×8×8" in cli("predict", digits_mlp, batch).stdout


def test_image_scale_is_a_deprecated_alias_of_pixel_max(cli, digit_files, digits_mlp):
    root, _ = digit_files
    old = cli("predict", digits_mlp, root / "grey.png", "--image-scale", "8", "--json")
    new = cli("predict", digits_mlp, root / "grey.png", "--pixel-max", "8", "--json")
    assert old.exit_code == 0 and new.exit_code == 0, old.output
    assert json.loads(old.stdout)["predictions"] == json.loads(new.stdout)["predictions"]
    warning = [line for line in old.stderr.splitlines() if line.strip()]
    assert len(warning) == 1 and warning[0].startswith("warning:") and "--pixel-max" in warning[0]
    assert not new.stderr.strip()
    assert "Deprecated" in cli("predict", "--help").stdout
    assert_one_error_line(cli("predict", digits_mlp, root / "grey.png", "--image-scale", "8", "--pixel-max", "8"),
                          "--image-scale", "--pixel-max")
    assert_one_error_line(cli("predict", digits_mlp, root / "grey.png", "--image-scale", "0"), "--image-scale")


def test_bad_files_are_one_error_line_in_both_commands(cli, tmp_path, digits_mlp):
    from PIL import Image

    np.save(tmp_path / "short.npy", np.zeros(63, dtype=np.float32))
    (tmp_path / "wide.csv").write_text("1,2,3,4,5\n")
    (tmp_path / "ragged.txt").write_text("1 2 3\n4 5\n")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    (tmp_path / "noise.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "short.npy").read_bytes()[:-40])
    (tmp_path / "latin1.csv").write_bytes("1,2,\xe9\n".encode("latin-1"))
    Image.fromarray(np.zeros((9, 8), dtype=np.uint8)).save(tmp_path / "tall.png")
    np.savez(tmp_path / "two.npz", a=np.zeros(64), b=np.zeros(64))
    with zipfile.ZipFile(tmp_path / "none.npz", "w") as archive:
        archive.writestr("readme.txt", "no arrays")
    (tmp_path / "vast.png").write_bytes(_png_header(10_000, 10_000))  # Pillow warns, then our size check
    cases = {
        "short.npy": ("shape 63 does not fit", "1×8×8"), "wide.csv": ("shape 1×5 does not fit",),
        "ragged.txt": ("different numbers of values",), "empty.txt": ("is empty",),
        "noise.png": ("not a readable image",), "cut.npy": ("truncated",), "latin1.csv": ("UTF-8",),
        "tall.png": ("8×9 pixels", "8×8", "resize"), "two.npz": ("name the inputs 'x'",),
        "none.npz": ("holds no arrays",), "vast.png": ("10000×10000 pixels", "resize"),
        "missing.npy": ("no such file",),
    }
    for name, fragments in cases.items():
        for command in ("predict", "explain"):
            assert_one_error_line(cli(command, digits_mlp, tmp_path / name), str(tmp_path / name), *fragments)


def test_an_image_file_for_a_feature_model_is_refused(tmp_path, digit_files):
    root, _ = digit_files
    with pytest.raises(UserError, match="feature vectors of 64, not images"):
        read_inputs(root / "grey.png", {"input_shape": [64]})
    (tmp_path / "named.csv").write_text("b,a,label\n2,1,cat\n")
    inputs = read_inputs(tmp_path / "named.csv", {"input_shape": [2], "feature_names": ["a", "b"]})
    np.testing.assert_array_equal(inputs.samples, [[1, 2]])  # the header chooses and orders the columns


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size and holds no pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def _npy_header(shape) -> bytes:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def test_arrays_declaring_gigabytes_are_refused_before_allocation(tmp_path):
    """Headers that declare 4 GB in a file of a few bytes: checked before np.load allocates. Run
    under a 3 GB address-space limit, so a regression fails (MemoryError) instead of eating memory."""
    import resource

    huge = (1_000_000, 1000)
    (tmp_path / "huge.npy").write_bytes(_npy_header(huge) + bytes(64))
    with zipfile.ZipFile(tmp_path / "huge.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", _npy_header(huge) + bytes(64))
    script = (
        "import sys\n"
        "from bigmodel_cli.engine.inputs import read_inputs\n"
        "from bigmodel_cli.errors import UserError\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        read_inputs(path, {'input_shape': [1000]})\n"
        "    except UserError as exc:\n"
        "        print(exc)\n"
    )
    limit = 3 * 1024**3

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "huge.npy"), str(tmp_path / "huge.npz")],
                          capture_output=True, text=True, timeout=120, preexec_fn=cap,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    npy, npz = proc.stdout.strip().splitlines()
    assert "truncated" in npy and "4,000,000,000 bytes" in npy
    assert "loads into memory" in npz and "4,000,000,000 bytes" in npz
