"""A tiny, randomly initialised causal LLM folder for tests (a helper module, not a test file).

:func:`make_tiny_llm_folder` writes, in well under 2 s, a Hugging Face folder shaped like
SmolLM2's: a byte-level BPE tokenizer trained on the given texts (ChatML chat template, eos =
``<|im_end|>``, separate pad and unk tokens, no BOS added) and a 2-layer ``LlamaForCausalLM``
with tied embeddings, saved as safetensors. Same texts + seed -> byte-identical files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

__all__ = ["CHATML_TEMPLATE", "RADIOLOGY_SENTENCES", "make_tiny_llm_folder"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "<pad>", "<|im_start|>", "<|im_end|>"]

RADIOLOGY_SENTENCES = [
    "Heart size is normal.",
    "The heart size is mildly enlarged.",
    "The cardiomediastinal silhouette is within normal limits.",
    "There is a small left pleural effusion.",
    "There is a small right pleural effusion.",
    "Moderate bilateral pleural effusions are present.",
    "No pleural effusion.",
    "No pneumothorax.",
    "There is no pneumothorax.",
    "A small apical pneumothorax is seen on the right.",
    "The lungs are clear.",
    "The lungs are clear bilaterally.",
    "No focal consolidation.",
    "There is a focal consolidation in the right lower lobe.",
    "Patchy opacity in the left lower lobe may represent atelectasis or pneumonia.",
    "Bibasilar atelectasis.",
    "Mild pulmonary vascular congestion.",
    "There is mild pulmonary edema.",
    "No acute cardiopulmonary process.",
    "No acute osseous abnormality.",
    "Degenerative changes of the thoracic spine.",
    "The mediastinal contours are normal.",
    "The hilar contours are unremarkable.",
    "A right internal jugular central venous catheter terminates in the superior vena cava.",
    "An endotracheal tube is in place, terminating above the carina.",
    "A nasogastric tube courses below the diaphragm.",
    "Median sternotomy wires are intact.",
    "A left-sided pacemaker is present with leads in the right atrium and right ventricle.",
    "There is a calcified granuloma in the left upper lobe.",
    "Lung volumes are low.",
    "Hyperinflation of the lungs is consistent with emphysema.",
    "Blunting of the left costophrenic angle.",
    "There is a nodular opacity in the right upper lobe.",
    "No free air under the diaphragm.",
    "Interval improvement of the right pleural effusion.",
    "Stable appearance of the chest compared to the prior study.",
    "The aorta is tortuous and calcified.",
    "Mild cardiomegaly without pulmonary edema.",
    "Findings are consistent with congestive heart failure.",
    "Clinical correlation is recommended.",
]


def make_tiny_llm_folder(path: str | Path, texts: Sequence[str] = RADIOLOGY_SENTENCES, vocab_size: int = 400,
                         seed: int = 0) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` and save it with a tiny random Llama to ``path``.

    Model: hidden 64, 2 layers, 4 heads (2 KV heads), intermediate 128, 512 positions, tied
    embeddings (like SmolLM2). ``vocab_size`` counts the 256 byte symbols and 5 special tokens,
    so it must exceed 261; fewer merges are learnt if the texts run out of pairs."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="<|im_end|>",
                                        unk_token="<unk>", pad_token="<pad>", chat_template=CHATML_TEMPLATE)
    tokenizer.save_pretrained(str(path))

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=ids["<s>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<pad>"],
                         # 0.2, not 0.02: the frozen tied embeddings of a random model must be large
                         # enough for logits to become confident (a real LLM has that by training)
                         initializer_range=0.2)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=ids["<s>"], eos_token_id=ids["<|im_end|>"],
                                               pad_token_id=ids["<pad>"])
    model.save_pretrained(str(path))
    return path
