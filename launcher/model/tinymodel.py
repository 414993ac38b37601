"""A tiny random-weight Llama checkpoint with a real tokenizer, made locally (no download).

Used by ``make smoke`` (served through the real engine) and by the tests (loaded by transformers).
Its native context is small (256 by default) so that a prompt past it is cheap. Imports torch and
transformers: never import this module from the CLI's start-up path.
"""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from", "his", "her", "an", "be", "this", "which", "or", "are", "had", "not", "but", "one", "were", "all", "they", "their", "there", "been", "has", "when", "who", "will", "more", "no", "if", "out", "so", "said", "what", "up", "its", "about", "into", "than", "them", "can", "only", "other", "new", "some", "could", "time", "these", "two", "may", "then", "do", "first", "any", "my", "now", "such", "like", "our", "over", "man", "me", "even", "most", "made", "after", "also", "did", "many", "before", "must", "through", "back", "years", "where", "much", "your", "way", "well", "down", "should", "because", "each", "just", "those", "people", "how", "too", "little", "state", "good", "very", "make", "world", "still", "own", "see", "men", "work", "long", "get", "here", "between", "both", "life", "being", "under", "never", "day", "same", "another", "know", "while", "last", "might", "us", "great", "old", "year", "off", "come", "since", "against", "go", "came", "right", "used", "take", "three", "pass", "key", "number", "remember", "find", "answer", "grass", "sky", "sun", "green", "blue", "yellow", "here", "again"]

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _vocabulary() -> list[str]:
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    digits = [str(d) for d in range(10)]
    punctuation = list(".,:;?!'\"-()[]{}<>/")
    words = list(dict.fromkeys(WORDS + ["user", "assistant", "system"]))
    filler = [f"w{i}" for i in range(1024 - len(specials) - len(digits) - len(punctuation) - len(words))]
    return specials + digits + punctuation + words + filler


def make_tokenizer(path: Path):
    """A word-level fast tokenizer (whitespace, digits split one by one), saved in ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def make_tiny_llama(path: Path, *, native_context: int = 256, seed: int = 0, head_dim: int = 128,
                    layers: int = 2, heads: int = 2, kv_heads: int = 2) -> Path:
    """Write a random-weight LlamaForCausalLM (fp16 safetensors) plus tokenizer into ``path``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=native_context,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(str(path), safe_serialization=True)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(str(path))
    # Write the config the way checkpoints on the Hub look: rope_scaling null, a torch_dtype.
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 10000.0
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = "float16"
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return path


if __name__ == "__main__":
    import sys

    print(make_tiny_llama(Path(sys.argv[1]), native_context=int(sys.argv[2]) if len(sys.argv) > 2 else 256))
