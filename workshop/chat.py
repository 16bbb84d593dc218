"""Chat with a LLaMA-2 model directory (HF layout), through the book's own LLaMA.

    python -m workshop.chat Llama-2-7b-chat-hf "What is a pneumothorax?" [--compile]
"""
import argparse

import torch

from model import Llama, Tokenizer, chat_prompt


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", help="model directory: config.json, safetensors, tokenizer.model")
    parser.add_argument("prompt", help="user message, wrapped in [INST] ... [/INST]")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                        help="weights dtype (7B in bfloat16 needs ~13.5 GB)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step (CUDA graphs on a GPU): same tokens, faster")
    args = parser.parse_args(argv)
    model = Llama.from_pretrained(args.path, dtype=getattr(torch, args.dtype), device=args.device)
    tokenizer = Tokenizer(args.path)
    prompt = tokenizer.encode(chat_prompt(args.prompt))
    [answer] = model.generate([prompt], max_new_tokens=args.max_new_tokens, eos_id=tokenizer.eos_id,
                              compile=args.compile)
    print(tokenizer.decode(answer).strip())


if __name__ == "__main__":
    main()
