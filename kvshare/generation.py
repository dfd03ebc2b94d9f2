"""Text generation helpers (greedy by default), for the CLI and the case studies."""

from __future__ import annotations

import torch


def format_prompt(tokenizer, prompt: str, chat: bool = True) -> str:
    """Apply the chat template when the model has one (instruct models), else the raw prompt."""
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


@torch.no_grad()
def generate_text(model, tokenizer, prompts, max_new_tokens: int = 64, chat: bool = True, **generate_kwargs):
    """Greedy completions of one prompt (returns str) or a list of prompts (returns list), batched."""
    single = isinstance(prompts, str)
    # a base model (kvshare.models.KIND) is never prompted through a chat template
    chat = chat and getattr(model, "kvshare_kind", None) != "base"
    templated = chat and bool(getattr(tokenizer, "chat_template", None))
    texts = [format_prompt(tokenizer, p, chat) for p in ([prompts] if single else prompts)]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only batches pad on the left
    try:
        # the chat template writes its own BOS; a plain prompt gets the tokenizer's (Gemma needs it)
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)
    finally:
        tokenizer.padding_side = side
    enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    kwargs.update(generate_kwargs)
    out = model.generate(**enc, **kwargs)
    completions = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    completions = [c.strip() for c in completions]
    return completions[0] if single else completions
