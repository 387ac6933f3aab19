"""Tiny random causal LMs built from configs, with a small trained BPE tokenizer.

They load in milliseconds, so unit tests can check exact identities on many architectures.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from steerport.models import LoadedModel

CORPUS = [
    "The movie was wonderful and the actors were great.",
    "The film was terrible, boring and far too long.",
    "I love this place; the food is good and the staff are kind.",
    "What a waste of time, I hate it.",
    "The weather today is mild with a light breeze from the west.",
    "Researchers measured the height of the tower in 1889.",
] * 4


@lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 200) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences (no files, no network)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


D = 32  # hidden size of every tiny model

CONFIGS = {
    "gpt2": dict(model_type="gpt2", n_embd=D, n_layer=2, n_head=4, n_positions=128),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128),
    "gptj": dict(model_type="gptj", n_embd=D, n_layer=2, n_head=4, rotary_dim=4, n_positions=128),
    "llama": dict(model_type="llama", hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128),
    "qwen2": dict(model_type="qwen2", hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128),
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=128,
                        sliding_window=16),
    "opt": dict(model_type="opt", hidden_size=D, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                word_embed_proj_dim=D, max_position_embeddings=128),
}
ARCHS = list(CONFIGS)


def tiny_model(arch: str = "llama", *, tied: bool | None = None, head_bias: bool = False, seed: int = 0,
               n_layers: int | None = None) -> LoadedModel:
    """A random tiny model of ``arch``; ``tied`` overrides weight tying, ``head_bias`` adds an LM-head bias,
    ``n_layers`` changes the number of decoder layers (default 2)."""
    from transformers import AutoConfig

    tok = tiny_tokenizer()
    kw = dict(CONFIGS[arch])
    model_type = kw.pop("model_type")
    if n_layers is not None:
        kw["n_layer" if "n_layer" in kw else "num_hidden_layers"] = n_layers
    kw.update(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    if tied is not None:
        kw["tie_word_embeddings"] = tied
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if head_bias:
        old = model.get_output_embeddings()
        head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        head.weight = torch.nn.Parameter(old.weight.detach().clone())
        torch.nn.init.normal_(head.bias, std=0.5)
        model.set_output_embeddings(head)
    model.eval().requires_grad_(False)
    return LoadedModel(spec=f"tiny-{arch}", model=model, tokenizer=tok)


def random_steer_factors(d: int = D, r: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, r, generator=g) * 0.3, torch.randn(d, r, generator=g) * 0.3
