"""Model files: metadata round trip, encryption, wrong/missing keys, damaged files, atomicity."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from bpnet.errors import BpnetError
from bpnet.model.meta import DEFAULT_NORMALIZATION, make_meta
from bpnet.pose import load_pose_config, pose_config_from_dict
from bpnet.specs import ModelConfig, default_pose_config_path, spec_to_dict

keras = pytest.importorskip("keras")

from bpnet.model.build import build_model
from bpnet.model.io import ENC_MAGIC, load_model, read_meta, save_model

POSE = load_pose_config(default_pose_config_path())


@pytest.fixture(scope="module")
def model_and_meta():
    cfg = ModelConfig(class_name="BpNetLiteModel", stages=2, width_multiplier=0.0625,
                      kernel_initializer="xavier")
    model = build_model(cfg, POSE)
    meta = make_meta(POSE, DEFAULT_NORMALIZATION, spec_to_dict(cfg))
    x = np.random.default_rng(0).normal(size=(1, 40, 48, 3)).astype("float32")
    return model, meta, x, model.predict(x, verbose=0)


def assert_same_outputs(model, x, ref):
    out = model.predict(x, verbose=0)
    assert len(out) == len(ref)
    for a, b in zip(out, ref):
        np.testing.assert_array_equal(a, b)


def test_plain_round_trip_keeps_weights_and_meta_and_is_a_keras_file(tmp_path, model_and_meta):
    model, meta, x, ref = model_and_meta
    path = save_model(model, tmp_path / "m.keras", meta)
    loaded, meta2 = load_model(path)
    assert meta2 == meta
    assert pose_config_from_dict(meta2["pose_config"]) == POSE
    assert loaded.output_names == model.output_names
    assert_same_outputs(loaded, x, ref)
    # Still a standard Keras archive: Keras alone loads it.
    plain = keras.saving.load_model(path, compile=False)
    assert_same_outputs(plain, x, ref)
    assert read_meta(path) == meta
    assert sorted(os.listdir(tmp_path)) == ["m.keras"]  # no temporary files left


def test_encrypted_round_trip_and_the_file_reveals_nothing(tmp_path, model_and_meta):
    model, meta, x, ref = model_and_meta
    path = save_model(model, tmp_path / "m.keras", meta, key="s3cret key")
    data = path.read_bytes()
    assert data.startswith(ENC_MAGIC)
    assert not zipfile.is_zipfile(path)
    for clear in (b"config.json", b"heatmap_out", b"right_shoulder", b"image_scale"):
        assert clear not in data
    loaded, meta2 = load_model(path, key="s3cret key")
    assert meta2 == meta
    assert_same_outputs(loaded, x, ref)
    assert read_meta(path, key="s3cret key") == meta
    # Same model, same key, fresh salt and nonce: different bytes.
    again = save_model(model, tmp_path / "m2.keras", meta, key="s3cret key").read_bytes()
    assert again != data


def test_missing_and_wrong_keys_are_one_clear_error(tmp_path, model_and_meta):
    model, meta, _, _ = model_and_meta
    path = save_model(model, tmp_path / "enc.keras", meta, key="right")
    with pytest.raises(BpnetError, match=r"enc.keras: the model file is encrypted; pass its key "
                                         r"with -k/--key"):
        load_model(path)
    for bad in ("wrong", "righ", "right "):
        with pytest.raises(BpnetError, match=r"wrong key for this encrypted model file"):
            load_model(path, key=bad)
    with pytest.raises(BpnetError, match="wrong key"):
        read_meta(path, key="wrong")
    with pytest.raises(BpnetError, match="non-empty string"):
        load_model(path, key="")


def test_a_key_given_for_a_plain_file_is_not_needed_but_harmless(tmp_path, model_and_meta, caplog):
    model, meta, x, ref = model_and_meta
    path = save_model(model, tmp_path / "plain.keras", meta)
    loaded, meta2 = load_model(path, key="unused")
    assert meta2 == meta
    assert_same_outputs(loaded, x, ref)
    assert "not encrypted" in caplog.text


def test_damaged_files_are_clear_errors(tmp_path, model_and_meta):
    model, meta, _, _ = model_and_meta
    plain = save_model(model, tmp_path / "plain.keras", meta).read_bytes()
    enc = save_model(model, tmp_path / "enc.keras", meta, key="k").read_bytes()
    cases = {
        "truncated_plain.keras": (plain[: len(plain) // 2], None, r"truncated or damaged"),
        "truncated_enc.keras": (enc[: len(enc) // 2], "k", r"wrong key .*or the file is damaged"),
        "header_only.keras": (enc[:20], "k", r"truncated"),
        "flipped_enc.keras": (enc[:-100] + bytes([enc[-100] ^ 1]) + enc[-99:], "k",
                              r"or the file is damaged"),
        "empty.keras": (b"", None, r"not a bpnet model file"),
        "text.keras": (b"hello, not a model\n" * 10, None, r"not a bpnet model file"),
    }
    # A bit flipped inside the weights of a plain archive: the zip CRC catches it.
    names = zipfile.ZipFile(tmp_path / "plain.keras").infolist()
    w = next(i for i in names if i.filename == "model.weights.h5")
    off = w.header_offset + 30 + len(w.filename) + len(w.extra) + w.compress_size // 2
    cases["flipped_plain.keras"] = (plain[:off] + bytes([plain[off] ^ 0xFF]) + plain[off + 1:],
                                    None, r"damaged")
    for name, (data, key, pattern) in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(BpnetError, match=pattern):
            load_model(p, key=key)
    # A zip archive that is not a Keras model.
    with zipfile.ZipFile(tmp_path / "other.keras", "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(BpnetError, match=r"not a Keras model archive \(missing config.json"):
        load_model(tmp_path / "other.keras")
    with pytest.raises(BpnetError, match="model file not found"):
        load_model(tmp_path / "nope.keras")
    with pytest.raises(BpnetError, match="is a folder"):
        load_model(tmp_path)


def test_failed_saves_leave_no_file_and_keep_the_old_one(tmp_path, model_and_meta):
    model, meta, _, _ = model_and_meta
    path = save_model(model, tmp_path / "m.keras", meta)
    before = path.read_bytes()
    with pytest.raises(BpnetError, match="not JSON serializable"):
        save_model(model, path, {"bad": object()})
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.keras"]
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(BpnetError, match="cannot write the model file"):
        save_model(model, blocker / "m.keras", meta)
    with pytest.raises(BpnetError, match="must be a dict"):
        save_model(model, tmp_path / "x.keras", ["not", "a", "dict"])
    assert not (tmp_path / "x.keras").exists()


def test_a_foreign_keras_file_loads_with_empty_meta(tmp_path):
    inp = keras.Input((4,))
    foreign = keras.Model(inp, keras.layers.Dense(2)(inp))
    foreign.save(tmp_path / "f.keras")
    loaded, meta = load_model(tmp_path / "f.keras")
    assert meta == {} and loaded.count_params() == foreign.count_params()


def test_read_meta_needs_no_keras(tmp_path, model_and_meta):
    model, meta, _, _ = model_and_meta
    save_model(model, tmp_path / "p.keras", meta)
    save_model(model, tmp_path / "e.keras", meta, key="k")
    code = ("import sys, json; from bpnet.model.io import read_meta; "
            f"a = read_meta({str(tmp_path / 'p.keras')!r}); "
            f"b = read_meta({str(tmp_path / 'e.keras')!r}, key='k'); "
            "print(json.dumps([a == b, a['stride'], 'keras' in sys.modules, "
            "'tensorflow' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [True, 8, False, False]
