"""The dataset registry: bundled digits, CSV, npz, text, synthetic."""

from __future__ import annotations

import numpy as np
import pytest

from bigmodel_cli.data import load_dataset, parse_data_arg
from bigmodel_cli.errors import UserError


def test_digits_is_the_real_bundled_dataset():
    data = load_dataset(parse_data_arg("digits"))
    assert data.x.shape == (1797, 1, 8, 8) and data.num_classes == 10
    assert data.x.min() == 0 and data.x.max() == 16
    sizes = {k: len(v) for k, v in data.splits.items()}
    assert sum(sizes.values()) == 1797 and 170 <= sizes["test"] <= 190
    assert not set(data.splits["train"]) & set(data.splits["test"])
    x, _ = data.arrays("train")
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05  # normalized with train statistics


def test_split_is_deterministic_and_stored():
    a, b = load_dataset(parse_data_arg("digits")), load_dataset(parse_data_arg("digits"))
    assert np.array_equal(a.splits["val"], b.splits["val"])
    assert a.spec["split"] == {"val": 0.1, "test": 0.1, "seed": 0}


def test_csv_with_named_target(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("a,b,kind\n" + "".join(f"{i},{i % 3},{'yes' if i % 2 else 'no'}\n" for i in range(40)))
    data = load_dataset(parse_data_arg(f"csv:{path}", "kind"))
    assert data.class_names == ["no", "yes"] and data.input_shape == (2,)
    assert data.spec["feature_names"] == ["a", "b"]


def test_csv_non_numeric_cell_names_line_and_column(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("a,b,y\n1,2,0\n3,oops,1\n")
    with pytest.raises(UserError, match=r"line 3, column 'b': 'oops' is not a number"):
        load_dataset(parse_data_arg(f"csv:{path}", "y"))


def test_csv_needs_target_and_existing_column(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("a,y\n1,0\n")
    with pytest.raises(UserError, match="needs --target"):
        parse_data_arg(f"csv:{path}")
    with pytest.raises(UserError, match="no column 'label'"):
        load_dataset(parse_data_arg(f"csv:{path}", "label"))


def test_empty_csv_is_refused(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("a,y\n")
    with pytest.raises(UserError, match="no data rows"):
        load_dataset(parse_data_arg(f"csv:{path}", "y"))


def test_npz_without_pickle(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, x=np.random.rand(30, 5).astype(np.float32), y=np.arange(30) % 3)
    assert load_dataset(parse_data_arg(f"npz:{good}")).num_classes == 3
    bad = tmp_path / "objects.npz"
    np.savez(bad, x=np.array([{"a": 1}] * 3, dtype=object), y=np.arange(3))
    with pytest.raises(UserError, match="without pickle"):
        load_dataset(parse_data_arg(f"npz:{bad}"))


def test_text_corpus_windows_and_position_split(corpus):
    import torch

    data = load_dataset(parse_data_arg(f"text:{corpus}"))
    assert data.spec["vocab_size"] == 256 and data.spec["bytes"] == 40_000
    assert data.ranges["train"][1] == data.ranges["val"][0] and data.ranges["test"][1] == 40_000
    x, y = data.windows([0, 100], 16)
    raw = corpus.read_bytes()
    assert bytes(x[0].tolist()) == raw[:16] and bytes(y[1].tolist()) == raw[101:117]
    starts = data.window_starts("train", 50, 16, torch.Generator().manual_seed(0))
    assert starts.max() + 17 <= data.ranges["train"][1]


def test_text_folder_reads_across_file_boundaries(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"abcdefgh" * 10)
    (tmp_path / "b.txt").write_bytes(b"12345678" * 10)
    data = load_dataset(parse_data_arg(f"text:{tmp_path}"))
    assert bytes(data.corpus.read(76, 8)) == b"efgh1234"


def test_stdlib_corpus_needs_no_download():
    data = load_dataset(parse_data_arg("text:stdlib"))
    assert data.spec["bytes"] > 1_000_000 and data.spec["files"] > 100


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(UserError, match="unknown dataset 'mnist'.*digits"):
        parse_data_arg("mnist")
