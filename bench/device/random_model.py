"""Build a random-weight model of a known shape, for speed work without downloading real weights.

    python bench/device/random_model.py --tokenizer .gpu/tokenizer --out /tmp/qwen0.5b-random

Timings do not depend on the weights' values when every completion is forced to full length
(min_new_tokens), so a random model of the right shape costs what the real one would. The
shape is Qwen2.5-0.5B's body (24 layers, hidden 896, 14 query and 2 key/value heads, MLP
4,864, tied embeddings) on the given tokenizer's vocabulary: with SmolLM2's 49,152 tokens,
0.40B parameters (Qwen's own 151,936-token vocabulary would make it 0.49B).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

QWEN25_05B_BODY = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
                       use_sliding_window=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="directory with tokenizer.json (and a chat template)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = Qwen2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **QWEN25_05B_BODY)
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(args.out)
    model.save_pretrained(out)
    for source in Path(args.tokenizer).iterdir():
        shutil.copy(source, out / source.name)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: random Qwen2.5-0.5B-shaped body, vocabulary {len(tokenizer):,}, {params / 1e9:.2f}B parameters")


if __name__ == "__main__":
    main()
