"""Config parsing as VITA's own loaders read the same files (whale encoder train.yaml)."""
import pytest
import yaml

from vita_engine.model.config import AudioConfig
from vita_engine.model.loading import CheckpointError


def _folder(tmp_path, transformer=None, model_conf=None):
    y = {"input_dim": 80,
         "encoder_conf": {"para_conf": {"transformer": {"transformer-attention-heads": 16, **(transformer or {})}}},
         "model_conf": {"kernel_size": 5, "norm": "layer", "activation_func": "gelu", "adpter_type": "subsampling",
                        **(model_conf or {})}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(y))
    return tmp_path


@pytest.mark.parametrize("key", ["transformer-chunk_size", "transformer-chunk-size", "transformer_chunk_size"])
def test_chunk_keys_in_every_spelling_whale_accepts(tmp_path, key):
    # whale's assign_args_from_dict maps '-' to '_' before matching its argparse names
    left = key.replace("chunk_size", "left_chunks").replace("chunk-size", "left-chunks")
    c = AudioConfig.from_folder(_folder(tmp_path, {key: 4, left: 16, "transformer-dynamic-chunks": False}))
    assert (c.chunk_size, c.left_chunks, c.dynamic_chunks, c.num_heads) == (4, 16, False, 16)


@pytest.mark.parametrize("value,dynamic", [(True, True), (False, False), ("false", False), ("True", True), (None, True)])
def test_dynamic_chunks_flag(tmp_path, value, dynamic):
    tr = {} if value is None else {"transformer-dynamic-chunks": value}  # absent: argparse default True
    assert AudioConfig.from_folder(_folder(tmp_path, tr)).dynamic_chunks is dynamic


@pytest.mark.parametrize("kind", ["cnn", "linear"])
def test_adapter_types_other_than_subsampling_warn(tmp_path, kind):
    # audioEncoder: "cnn" is CNNAdapter (two convs, BatchNorm, left padding), "linear" a Linear; the
    # tensors' shapes then decide (CNNAdapter's conv1d2 is [4d, 2d, k], not CNNSubsampling's [2d, d, k])
    with pytest.warns(UserWarning, match="adpter_type"):
        AudioConfig.from_folder(_folder(tmp_path, model_conf={"adpter_type": kind}))


def test_cnn_adapter_weights_are_refused_by_shape(tiny_ckpt, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from vita_engine.model.vita import VitaModel

    d = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, d)
    for f in sorted(d.glob("model-*.safetensors")):
        t = load_file(str(f))
        k = "model.audio_encoder.adpter.conv1d2.weight"
        if k in t:  # CNNAdapter's second conv: 2*enc -> 4*enc channels
            o, i, kk = t[k].shape
            t[k] = torch.zeros(2 * o, o, kk, dtype=t[k].dtype)
            save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="conv1d2"):
        VitaModel.from_pretrained(d, load_tts=False, load_codec_model=False)
