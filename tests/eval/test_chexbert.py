"""CheXbert labeler: offline loading of the released checkpoint layout, vocabulary check, mapping."""

from __future__ import annotations

import csv
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig

from eval.chexpert.chexbert import (
    BERT_BASE_UNCASED_VOCAB_SHA256,
    CHEXBERT_CONDITIONS,
    CheXbertLabeler,
    CheXbertNet,
    bert_base_uncased_config,
    build_tokenizer,
    check_vocab,
    classes_to_labels,
    default_vocab_path,
    encode_reports,
)
from eval.chexpert.observations import CHEXPERT_14, NO_FINDING

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
TEXTS = ["No pleural effusion.", "Cardiomegaly with mild\n\n pulmonary edema.", "Possible left lower lobe pneumonia."]
LABEL_VALUES = {1.0, 0.0, -1.0}


def small_config() -> BertConfig:
    """A 2-layer BERT over the real vocabulary: same key layout as chexbert.pth, smaller shapes."""
    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=512, type_vocab_size=2)


def save_released_layout(net: CheXbertNet, path: Path, **extra: object) -> Path:
    """Save like CheXbert's training script: DataParallel keys under 'model_state_dict'."""
    state = {"module." + k: v for k, v in net.state_dict().items()}
    torch.save({"epoch": 1, "model_state_dict": state, **extra}, path)
    return path


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a connection or resolve a host fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(socket, "socket", NoSocket)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_released_layout(CheXbertNet(small_config()), tmp_path_factory.mktemp("chexbert") / "small.pth")


# ----------------------------------------------------------------------------- vocabulary / tokens


def test_shipped_vocab_is_bert_base_uncased():
    path = default_vocab_path()
    vocab = check_vocab(path)
    assert len(vocab) == 30522 and path.stat().st_size == 231_508
    assert (vocab["[PAD]"], vocab["[UNK]"], vocab["[CLS]"], vocab["[SEP]"], vocab["[MASK]"]) == (0, 100, 101, 102, 103)
    assert len(BERT_BASE_UNCASED_VOCAB_SHA256) == 64


def test_tokenizer_gives_bert_ids():
    tok = build_tokenizer()
    # no / pl ##eur ##al / e ##ff ##usion / . between [CLS] and [SEP]
    assert tok("No pleural effusion.")["input_ids"] == [101, 2053, 20228, 11236, 2389, 1041, 4246, 14499, 1012, 102]
    assert tok.tokenize("Hello WORLD") == ["hello", "world"]
    assert tok("hello world")["input_ids"] == [101, 7592, 2088, 102]


def test_encode_cleans_and_truncates_like_chexbert():
    tok = build_tokenizer()
    texts = ["No pleural effusion.", "  No\n\npleural \t effusion. \n", "  \n", "lung " * 600]
    a, b, empty, long = encode_reports(texts, tok)
    assert a == b  # whitespace and newlines collapse
    assert empty == [101, 102]
    assert len(long) == 512 and long[0] == 101 and long[-1] == 102 and long[1:-1] == [long[1]] * 510
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        encode_reports(["ok", None], tok)


@pytest.mark.parametrize("change", ["swap", "crlf", "extra"])
def test_non_identical_vocab_is_refused(tmp_path, small_ckpt, change):
    lines = default_vocab_path().read_text(encoding="utf-8").split("\n")
    if change == "swap":
        lines[2000], lines[2001] = lines[2001], lines[2000]
        text = "\n".join(lines)
    elif change == "crlf":
        text = "\r\n".join(lines)
    else:
        text = "\n".join(lines[:-1] + ["[extra]", ""])
    bad = tmp_path / "vocab.txt"
    bad.write_bytes(text.encode("utf-8"))
    with pytest.raises(ValueError, match="not bert-base-uncased's vocab.txt"):
        check_vocab(bad)
    with pytest.raises(ValueError, match=str(bad)):
        CheXbertLabeler(small_ckpt, vocab_path=bad, config=small_config())


def test_user_vocab_path_accepted(tmp_path, small_ckpt):
    mine = tmp_path / "my_vocab.txt"
    mine.write_bytes(default_vocab_path().read_bytes())
    lab = CheXbertLabeler(small_ckpt, vocab_path=mine, config=small_config())
    assert lab(["no effusion"]).shape == (1, 14)


def test_missing_vocab_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab file not found"):
        check_vocab(tmp_path / "nope.txt")


def test_no_unknown_tokens_on_real_reports():
    path = SHARED / "reports" / "iu_xray_dev.csv"
    if not path.is_file():
        pytest.skip(f"real reports not found at {path}")
    with path.open(newline="", encoding="utf-8") as f:
        texts = [f"{r['findings']} {r['impression']}" for r in csv.DictReader(f)]
    ids = encode_reports(texts, build_tokenizer())
    pieces = sum(len(i) - 2 for i in ids)
    unknown = sum(i.count(100) for i in ids)
    assert len(ids) == 1925 and pieces > 100_000
    assert unknown == 0  # measured: 0 [UNK] in 130,193 word pieces


# ----------------------------------------------------------------------------- label mapping


def test_classes_to_labels_maps_and_reorders():
    # Head j (CheXbert order) predicts class j % 4; the No Finding head (last) predicts 1.
    classes = np.array([[j % 4 for j in range(13)] + [1], [0] * 14])
    got = classes_to_labels(classes)
    value = {0: np.nan, 1: 1.0, 2: 0.0, 3: -1.0}
    for j, name in enumerate(CHEXBERT_CONDITIONS[:13]):
        np.testing.assert_equal(got[0, CHEXPERT_14.index(name)], value[j % 4])
    assert got[0, CHEXPERT_14.index(NO_FINDING)] == 1.0 and CHEXPERT_14.index(NO_FINDING) == 0
    assert np.isnan(got[1]).all()
    assert got[0, CHEXPERT_14.index("Cardiomegaly")] == 1.0  # head 1
    assert got[0, CHEXPERT_14.index("Pleural Effusion")] == 1.0  # head 9
    assert np.isnan(got[0, CHEXPERT_14.index("Pneumothorax")])  # head 8
    assert got[0, CHEXPERT_14.index("Lung Lesion")] == -1.0  # head 3
    with pytest.raises(ValueError, match="No Finding"):
        classes_to_labels(np.array([[0] * 13 + [2]]))


def test_forced_heads_come_through_the_whole_pipeline(tmp_path, no_network):
    torch.manual_seed(1)
    net = CheXbertNet(small_config())
    with torch.no_grad():  # make every head ignore the text and pick a fixed class
        for j, head in enumerate(net.linear_heads):
            head.weight.zero_()
            head.bias.fill_(-10.0)
            head.bias[1 if j == 13 else j % 4] = 10.0
    lab = CheXbertLabeler(save_released_layout(net, tmp_path / "forced.pth"), config=small_config())
    got = lab(TEXTS)
    want = classes_to_labels(np.array([[j % 4 for j in range(13)] + [1]] * 3))
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- loading / labelling


def test_labels_and_embeddings_offline(small_ckpt, no_network):
    lab = CheXbertLabeler(small_ckpt, config=small_config(), batch_size=2)
    assert lab.name == "chexbert" and lab.info["checkpoint"] == str(small_ckpt)
    y = lab(TEXTS)
    assert y.shape == (3, 14) and y.dtype == float
    assert set(y[~np.isnan(y)].tolist()) <= LABEL_VALUES
    assert set(y[:, 0][~np.isnan(y[:, 0])].tolist()) <= {1.0}  # No Finding: positive or blank
    e = lab.embed(TEXTS)
    assert e.shape == (3, 32) and np.isfinite(e).all()
    # Padding and the length-sorted batching do not change any report's result.
    one = CheXbertLabeler(small_ckpt, config=small_config(), batch_size=1)
    np.testing.assert_array_equal(one(TEXTS), y)
    np.testing.assert_allclose(one.embed(TEXTS), e, atol=1e-5)
    y2, e2 = lab.label_and_embed(TEXTS)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_allclose(e2, e, atol=1e-6)
    assert lab([]).shape == (0, 14)
    with pytest.raises(TypeError, match="not a single string"):
        lab("one report")


def test_legacy_position_ids_key_is_tolerated(tmp_path, small_ckpt):
    ckpt = torch.load(small_ckpt, weights_only=True)
    ckpt["model_state_dict"]["module.bert.embeddings.position_ids"] = torch.arange(512)[None]
    torch.save(ckpt, tmp_path / "legacy.pth")
    assert CheXbertLabeler(tmp_path / "legacy.pth", config=small_config())(TEXTS[:1]).shape == (1, 14)


def _mutated(small_ckpt: Path, tmp_path: Path, how: str) -> Path:
    ckpt = torch.load(small_ckpt, weights_only=True)
    state = ckpt["model_state_dict"]
    if how == "renamed_heads":
        for k in [k for k in state if "linear_heads" in k]:
            state[k.replace("linear_heads", "classifier")] = state.pop(k)
    elif how == "missing_head":
        del state["module.linear_heads.13.bias"]
    elif how == "no_state_dict":
        ckpt = {"state_dict": state}
    elif how == "wrong_shape":
        state["module.linear_heads.13.weight"] = torch.zeros(4, 32)
    path = tmp_path / f"{how}.pth"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("how, match", [
    ("renamed_heads", r"missing 28 \['linear_heads.0.bias'.*unexpected 28 \['classifier.0.bias'"),
    ("missing_head", r"missing 1 \['linear_heads.13.bias'\]"),
    ("no_state_dict", r"no 'model_state_dict' entry \(found \['state_dict'\]\)"),
    ("wrong_shape", r"linear_heads.13.weight: file \(4, 32\) vs model \(2, 32\)"),
])
def test_wrong_layout_gives_clear_error(tmp_path, small_ckpt, how, match):
    path = _mutated(small_ckpt, tmp_path, how)
    with pytest.raises(ValueError, match=match) as err:
        CheXbertLabeler(path, config=small_config())
    assert str(path) in str(err.value)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        CheXbertLabeler(tmp_path / "nope.pth", config=small_config())


@pytest.mark.slow
def test_full_size_random_checkpoint_of_the_real_layout(tmp_path, no_network):
    """bert-base-uncased + 14 heads, random weights, saved exactly like the released chexbert.pth."""
    torch.manual_seed(0)
    net = CheXbertNet(bert_base_uncased_config())
    path = save_released_layout(net, tmp_path / "chexbert.pth")
    state = {"module." + k: v for k, v in net.state_dict().items()}  # what was saved
    assert len(state) == 227  # 5 embedding + 12 x 16 encoder + 2 pooler + 14 x 2 head tensors
    assert state["module.bert.embeddings.word_embeddings.weight"].shape == (30522, 768)
    assert state["module.linear_heads.0.weight"].shape == (4, 768)
    assert state["module.linear_heads.13.bias"].shape == (2,)
    del state, net
    lab = CheXbertLabeler(path)
    y = lab(TEXTS)
    assert y.shape == (3, 14)
    assert set(y[~np.isnan(y)].tolist()) <= LABEL_VALUES
    assert lab.embed(TEXTS[:2]).shape == (2, 768)
    path.unlink()  # ~440 MB
